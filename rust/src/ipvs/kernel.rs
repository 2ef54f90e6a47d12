//! The kernel's IPVS table over generic netlink, a sync's operations in a few sends.
//!
//! The kernel handles every message of one `sendmsg` in turn and commits each on its own; it
//! acknowledges a message that asks for it and reports every error whether asked or not. So
//! only the last message of a chunk asks for an acknowledgement: once it arrives, every
//! earlier error of the chunk has been read, each naming its message by sequence number.
//! Upstream sends one request per object and waits for each answer.

use super::message::{self, CMD_SET_CONFIG};
use super::{Backend, Dest, DestKey, Op, Outcome, Table, VirtualKey};
use crate::error::{Error, Result};
use crate::netlink::{messages, Socket, NLMSG_DONE, NLMSG_ERROR, NLM_F_ACK};
use std::collections::BTreeMap;
use std::time::Duration;

const NETLINK_GENERIC: i32 = 16;
/// Bytes per send: well under the socket's send buffer (the kernel refuses a message larger
/// than it with EMSGSIZE).
const CHUNK_BYTES: usize = 96 * 1024;
/// Room for every error of a chunk, which all arrive before the first is read.
const RECEIVE_BUFFER: i32 = 8 << 20;

fn err(message: String, errno: Option<i32>) -> Error {
    Error::Netlink {
        op: "ipvs netlink",
        errno,
        message,
    }
}

pub struct Client {
    sock: Socket,
    family: u16,
    seq: u32,
    /// Messages per send at most: unbounded but for the byte limit; 1 sends each operation
    /// alone and waits for its answer, as upstream does (the benchmark's baseline).
    pub per_send: usize,
    /// System calls made (sends and receives), for the benchmark.
    pub syscalls: u64,
    buf: Vec<u8>,
}

impl Client {
    /// Resolve the IPVS family (the kernel loads ip_vs on demand where it can).
    pub fn open() -> Result<Client> {
        let sock = Socket::open(NETLINK_GENERIC, Duration::from_secs(10))
            .map_err(|e| err(format!("netlink socket: {e}"), e.raw_os_error()))?;
        sock.grow_receive_buffer(RECEIVE_BUFFER);
        sock.short_acks();
        let mut c = Client {
            sock,
            family: 0,
            seq: 1,
            per_send: usize::MAX,
            syscalls: 0,
            buf: vec![0u8; 64 * 1024],
        };
        c.sock
            .send(&message::get_family(c.seq))
            .map_err(|e| err(format!("send: {e}"), e.raw_os_error()))?;
        let mut buf = std::mem::take(&mut c.buf);
        loop {
            let n = c.recv(&mut buf)?;
            for m in messages(&buf[..n]).map_err(|e| err(e, None))? {
                if let Some(code) = m.error_code() {
                    if code == libc::ENOENT {
                        return Err(err(
                            "the kernel has no IPVS: load the ip_vs module (modprobe ip_vs)".into(),
                            Some(code),
                        ));
                    }
                    if code != 0 {
                        let e = std::io::Error::from_raw_os_error(code);
                        return Err(err(format!("IPVS family lookup: {e}"), Some(code)));
                    }
                    if c.family != 0 {
                        c.buf = buf;
                        return Ok(c);
                    }
                } else if let Some(id) = message::family_id(m.payload) {
                    c.family = id;
                }
            }
        }
    }

    fn recv(&mut self, buf: &mut [u8]) -> Result<usize> {
        self.syscalls += 1;
        self.sock.recv(buf).map_err(|e| {
            // ENOBUFS: acknowledgements were lost; EAGAIN: none came in time. Either way what
            // the kernel did is unknown, and the caller resynchronises from a dump.
            err(format!("receive: {e}"), e.raw_os_error())
        })
    }

    /// The sequence number the next message gets (never 0).
    fn peek_seq(&self) -> u32 {
        self.seq.wrapping_add(1).max(1)
    }

    fn next_seq(&mut self) -> u32 {
        self.seq = self.peek_seq();
        self.seq
    }

    /// Send one chunk (message bytes with their sequence numbers, the last one acknowledged)
    /// and collect its errors as (index in `ops`, errno).
    fn send_chunk(
        &mut self,
        batch: &[u8],
        seqs: &[(u32, usize)],
        refused: &mut Vec<(usize, i32)>,
    ) -> Result<()> {
        let Some(&(last, _)) = seqs.last() else {
            return Ok(());
        };
        self.sock
            .send(batch)
            .map_err(|e| err(format!("send: {e}"), e.raw_os_error()))?;
        self.syscalls += 1;
        let first = seqs[0].0;
        let mut buf = std::mem::take(&mut self.buf);
        let result = loop {
            let n = match self.recv(&mut buf) {
                Ok(n) => n,
                Err(e) => break Err(e),
            };
            let mut done = false;
            match messages(&buf[..n]) {
                Err(e) => break Err(err(e, None)),
                Ok(msgs) => {
                    for m in msgs {
                        if m.kind != NLMSG_ERROR || m.seq < first || m.seq > last {
                            continue;
                        }
                        let code = m.error_code().unwrap_or(libc::EPROTO);
                        if code != 0 {
                            refused.push((seqs[(m.seq - first) as usize].1, code));
                        }
                        done |= m.seq == last;
                    }
                }
            }
            if done {
                break Ok(());
            }
        };
        self.buf = buf;
        result
    }

    /// IPVS connection timeouts in seconds (0 keeps the kernel's own).
    pub fn set_timeouts(&mut self, tcp: u32, tcp_fin: u32, udp: u32) -> Result<()> {
        let seq = self.next_seq();
        let msg = message::set_timeouts(self.family, seq, tcp, tcp_fin, udp);
        let mut refused = Vec::new();
        self.send_chunk(&msg, &[(seq, 0)], &mut refused)?;
        match refused.first() {
            None => Ok(()),
            Some((_, code)) => Err(err(
                format!(
                    "IPVS command {CMD_SET_CONFIG} (timeouts): {}",
                    std::io::Error::from_raw_os_error(*code)
                ),
                Some(*code),
            )),
        }
    }

    /// Every message of a dump request until NLMSG_DONE.
    fn dump(&mut self, request: Vec<u8>) -> Result<Vec<Vec<u8>>> {
        self.syscalls += 1;
        self.sock
            .send(&request)
            .map_err(|e| err(format!("send: {e}"), e.raw_os_error()))?;
        let mut buf = std::mem::take(&mut self.buf);
        let result = self.read_dump(&mut buf);
        self.buf = buf;
        result
    }

    fn read_dump(&mut self, buf: &mut [u8]) -> Result<Vec<Vec<u8>>> {
        let mut out = Vec::new();
        loop {
            let n = self.recv(buf)?;
            for m in messages(&buf[..n]).map_err(|e| err(e, None))? {
                match m.kind {
                    NLMSG_DONE => return Ok(out),
                    NLMSG_ERROR => {
                        let code = m.error_code().unwrap_or(libc::EPROTO);
                        if code != 0 {
                            let e = std::io::Error::from_raw_os_error(code);
                            return Err(err(format!("IPVS dump: {e}"), Some(code)));
                        }
                    }
                    _ => out.push(m.payload.to_vec()),
                }
            }
        }
    }
}

impl Backend for Client {
    fn apply(&mut self, ops: &[Op]) -> Result<Outcome> {
        let mut out = Outcome {
            sent: ops.len(),
            ..Outcome::default()
        };
        let mut i = 0;
        while i < ops.len() {
            let mut batch = Vec::with_capacity(CHUNK_BYTES);
            let mut seqs: Vec<(u32, usize)> = Vec::new();
            let mut last_at = 0;
            while i < ops.len() {
                let seq = self.peek_seq();
                let m = message::encode(&ops[i], self.family, seq, false);
                if !batch.is_empty()
                    && (batch.len() + m.len() > CHUNK_BYTES || seqs.len() >= self.per_send)
                {
                    break;
                }
                self.seq = seq;
                seqs.push((seq, i));
                last_at = batch.len();
                batch.extend_from_slice(&m);
                i += 1;
            }
            // Only the chunk's last message asks for an acknowledgement (header bytes 6-7).
            let flags = u16::from_ne_bytes([batch[last_at + 6], batch[last_at + 7]]) | NLM_F_ACK;
            batch[last_at + 6..last_at + 8].copy_from_slice(&flags.to_ne_bytes());
            out.messages_per_send.push(seqs.len());
            self.send_chunk(&batch, &seqs, &mut out.refused)?;
        }
        Ok(out)
    }

    fn dump(&mut self, v6: bool) -> Result<Table> {
        let seq = self.next_seq();
        let mut table = Table::new();
        for payload in self.dump(message::dump_services(self.family, seq))? {
            if let Some((k, s)) = message::decode_service(&payload) {
                if k.addr.is_ipv6() == v6 {
                    message::insert_service(&mut table, k, s);
                }
            }
        }
        for (k, v) in table.iter_mut() {
            v.dests = Backend::dests(self, k)?;
        }
        Ok(table)
    }

    fn dests(&mut self, k: &VirtualKey) -> Result<BTreeMap<DestKey, Dest>> {
        let seq = self.next_seq();
        let fam = message::family_of(k);
        let mut out = BTreeMap::new();
        for payload in self.dump(message::dump_dests(self.family, seq, k))? {
            if let Some((d, dest)) = message::decode_dest(&payload, fam) {
                out.insert(d, dest);
            }
        }
        Ok(out)
    }
}
