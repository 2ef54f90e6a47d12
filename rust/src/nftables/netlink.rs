//! Element updates straight to the kernel over nfnetlink, in one batch (one transaction).
//!
//! A partial sync is nearly always a handful of element additions and deletions. Through
//! `nft -f` each costs a process start and a table cache fetch: 12-20 ms at 30,000 Services on
//! this project's machines, whatever the change. Encoding the few messages here takes
//! microseconds and the kernel applies the batch atomically, as `nft` would.
//!
//! Only element operations on kproxy's own sets are sent this way ([`supports`]); anything else
//! (chains, rules, set declarations, interval sets) goes through `nft -f`.

use super::ast::{Data, Key, Op, Value};
use super::render::FIREWALL_ALLOW;
use crate::error::{Error, Result};
use crate::model::IpFamily;
use std::io;

const NETLINK_NETFILTER: i32 = 12;
const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
const NFNL_MSG_BATCH_END: u16 = 0x11;
const NFT_MSG_NEWSETELEM: u16 = 12;
const NFT_MSG_DELSETELEM: u16 = 14;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_CREATE: u16 = 0x400;
const NLMSG_ERROR: u16 = 0x2;
const NLA_F_NESTED: u16 = 0x8000;
const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
const NFTA_SET_ELEM_LIST_SET: u16 = 2;
const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_SET_ELEM_KEY: u16 = 1;
const NFTA_SET_ELEM_DATA: u16 = 2;
const NFTA_DATA_VALUE: u16 = 1;
const NFTA_DATA_VERDICT: u16 = 2;
const NFTA_VERDICT_CODE: u16 = 1;
const NFTA_VERDICT_CHAIN: u16 = 2;
const NF_DROP: i32 = 0;
const NFT_GOTO: i32 = -4;

/// Larger updates go through `nft -f` (the socket's send buffer bounds one batch).
const MAX_ELEMENTS: usize = 2000;

/// Whether every operation can be sent as netlink element messages.
pub fn supports(ops: &[Op]) -> bool {
    let mut n = 0;
    !ops.is_empty()
        && ops.iter().all(|op| match op {
            Op::AddElements(set, e) => {
                n += e.len();
                set != FIREWALL_ALLOW
            }
            Op::DeleteElements(set, k) => {
                n += k.len();
                set != FIREWALL_ALLOW
            }
            _ => false,
        })
        && n <= MAX_ELEMENTS
}

/// A netlink message under construction.
struct Msg(Vec<u8>);

impl Msg {
    fn new(kind: u16, flags: u16, seq: u32, family: u8, res_id: u16) -> Msg {
        let mut b = Vec::with_capacity(256);
        b.extend_from_slice(&0u32.to_ne_bytes()); // length, patched in finish()
        b.extend_from_slice(&kind.to_ne_bytes());
        b.extend_from_slice(&flags.to_ne_bytes());
        b.extend_from_slice(&seq.to_ne_bytes());
        b.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel's
        b.extend_from_slice(&[family, 0]); // nfgenmsg: family, version
        b.extend_from_slice(&res_id.to_be_bytes());
        Msg(b)
    }

    fn pad(&mut self) {
        while self.0.len() % 4 != 0 {
            self.0.push(0);
        }
    }

    fn attr(&mut self, kind: u16, payload: &[u8]) {
        let len = (4 + payload.len()) as u16;
        self.0.extend_from_slice(&len.to_ne_bytes());
        self.0.extend_from_slice(&kind.to_ne_bytes());
        self.0.extend_from_slice(payload);
        self.pad();
    }

    fn str_attr(&mut self, kind: u16, s: &str) {
        let mut v = s.as_bytes().to_vec();
        v.push(0);
        self.attr(kind, &v);
    }

    /// Open a nested attribute; close it with [`Msg::end`].
    fn begin(&mut self, kind: u16) -> usize {
        let at = self.0.len();
        self.0.extend_from_slice(&0u16.to_ne_bytes());
        self.0
            .extend_from_slice(&(kind | NLA_F_NESTED).to_ne_bytes());
        at
    }

    fn end(&mut self, at: usize) {
        let len = (self.0.len() - at) as u16;
        self.0[at..at + 2].copy_from_slice(&len.to_ne_bytes());
    }

    fn finish(mut self) -> Vec<u8> {
        let len = self.0.len() as u32;
        self.0[0..4].copy_from_slice(&len.to_ne_bytes());
        self.0
    }
}

/// A key or map value in the kernel's register layout: each component padded to 4 bytes;
/// addresses and ports in network order, numgen integers in host order.
fn encode_key(key: &[Value]) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(key.len() * 8);
    for v in key {
        match v {
            Value::Addr(std::net::IpAddr::V4(a)) => out.extend_from_slice(&a.octets()),
            Value::Addr(std::net::IpAddr::V6(a)) => out.extend_from_slice(&a.octets()),
            Value::Proto(p) => out.extend_from_slice(&[ip_proto(*p), 0, 0, 0]),
            Value::Port(p) => {
                out.extend_from_slice(&p.to_be_bytes());
                out.extend_from_slice(&[0, 0]);
            }
            Value::Int(i) => out.extend_from_slice(&i.to_ne_bytes()),
            Value::Cidr(_) => {
                return Err(Error::InvalidInput(
                    "netlink: interval elements go through nft".into(),
                ))
            }
        }
    }
    Ok(out)
}

fn ip_proto(p: crate::model::Protocol) -> u8 {
    match p {
        crate::model::Protocol::Tcp => 6,
        crate::model::Protocol::Udp => 17,
        crate::model::Protocol::Sctp => 132,
    }
}

fn element(m: &mut Msg, key: &Key, data: Option<&Data>) -> Result<()> {
    let e = m.begin(NFTA_LIST_ELEM);
    let k = m.begin(NFTA_SET_ELEM_KEY);
    m.attr(NFTA_DATA_VALUE, &encode_key(key)?);
    m.end(k);
    if let Some(d) = data {
        let dd = m.begin(NFTA_SET_ELEM_DATA);
        match d {
            Data::Dnat(ip, port) => m.attr(
                NFTA_DATA_VALUE,
                &encode_key(&[Value::Addr(*ip), Value::Port(*port)])?,
            ),
            Data::Drop | Data::Goto(_) => {
                let v = m.begin(NFTA_DATA_VERDICT);
                let code = if matches!(d, Data::Drop) {
                    NF_DROP
                } else {
                    NFT_GOTO
                };
                m.attr(NFTA_VERDICT_CODE, &code.to_be_bytes());
                if let Data::Goto(chain) = d {
                    m.str_attr(NFTA_VERDICT_CHAIN, chain);
                }
                m.end(v);
            }
        }
        m.end(dd);
    }
    m.end(e);
    Ok(())
}

/// An element to send: its key, and its data in a map.
type ElementRef<'a> = (&'a Key, Option<&'a Data>);

/// Elements per message: a nested netlink attribute is at most 64 KiB.
const PER_MESSAGE: usize = 256;

/// The batch for `ops` (all element operations, see [`supports`]): the bytes, the number of
/// element messages (each is acknowledged) and the last sequence number used.
pub fn encode(
    family: IpFamily,
    table: &str,
    ops: &[Op],
    seq0: u32,
) -> Result<(Vec<u8>, usize, u32)> {
    let fam = match family {
        IpFamily::V4 => 2u8,  // NFPROTO_IPV4
        IpFamily::V6 => 10u8, // NFPROTO_IPV6
    };
    let mut out = Msg::new(
        NFNL_MSG_BATCH_BEGIN,
        NLM_F_REQUEST,
        seq0,
        0,
        NFNL_SUBSYS_NFTABLES,
    )
    .finish();
    let mut seq = seq0;
    let mut messages = 0;
    for op in ops {
        let (set, kind, flags, elems): (&str, u16, u16, Vec<ElementRef<'_>>) = match op {
            Op::AddElements(s, e) => (
                s,
                NFT_MSG_NEWSETELEM,
                NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE,
                e.iter().map(|(k, d)| (k, d.as_ref())).collect(),
            ),
            Op::DeleteElements(s, keys) => (
                s,
                NFT_MSG_DELSETELEM,
                NLM_F_REQUEST | NLM_F_ACK,
                keys.iter().map(|k| (k, None)).collect(),
            ),
            _ => {
                return Err(Error::InvalidInput(
                    "netlink: not an element operation".into(),
                ))
            }
        };
        for chunk in elems.chunks(PER_MESSAGE) {
            seq += 1;
            messages += 1;
            let mut m = Msg::new((NFNL_SUBSYS_NFTABLES << 8) | kind, flags, seq, fam, 0);
            m.str_attr(NFTA_SET_ELEM_LIST_TABLE, table);
            m.str_attr(NFTA_SET_ELEM_LIST_SET, set);
            let list = m.begin(NFTA_SET_ELEM_LIST_ELEMENTS);
            for (k, d) in chunk {
                element(&mut m, k, *d)?;
            }
            m.end(list);
            out.extend(m.finish());
        }
    }
    seq += 1;
    out.extend(
        Msg::new(
            NFNL_MSG_BATCH_END,
            NLM_F_REQUEST,
            seq,
            0,
            NFNL_SUBSYS_NFTABLES,
        )
        .finish(),
    );
    Ok((out, messages, seq))
}

fn apply_err(what: String) -> Error {
    Error::Apply {
        op: "nfnetlink batch",
        code: None,
        stderr: what,
    }
}

/// Send `ops` as one batch and wait for every acknowledgement. The kernel applies the batch
/// completely or not at all; the first error it reports is returned.
pub fn apply(family: IpFamily, table: &str, ops: &[Op]) -> Result<usize> {
    let seq0 = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as u32)
        .unwrap_or(1);
    let (batch, messages, last) = encode(family, table, ops, seq0)?;
    let sock = Socket::open().map_err(|e| apply_err(format!("socket: {e}")))?;
    sock.send(&batch)
        .map_err(|e| apply_err(format!("send: {e}")))?;
    // One acknowledgement per element message (the batch markers get none).
    let mut pending = messages;
    let mut buf = vec![0u8; 64 * 1024];
    while pending > 0 {
        let n = sock
            .recv(&mut buf)
            .map_err(|e| apply_err(format!("recv: {e}")))?;
        pending = pending.saturating_sub(read_acks(&buf[..n], seq0, last)?);
    }
    Ok(batch.len())
}

/// Read one datagram of replies to a batch sent with sequence numbers `seq0..=last`: the
/// number of successful acknowledgements in it, or the kernel's refusal. Replies to other
/// requests are ignored; a message whose length does not fit the datagram is an error, so
/// nothing past it is trusted. Pure, so the fuzz tests can feed it anything.
pub fn read_acks(reply: &[u8], seq0: u32, last: u32) -> Result<usize> {
    let word = |at: usize| -> u32 {
        u32::from_ne_bytes([reply[at], reply[at + 1], reply[at + 2], reply[at + 3]])
    };
    let mut acks = 0;
    let mut at = 0;
    while reply.len() - at >= 16 {
        let len = word(at) as usize;
        let kind = u16::from_ne_bytes([reply[at + 4], reply[at + 5]]);
        let seq = word(at + 8);
        if len < 16 || len > reply.len() - at {
            return Err(apply_err("malformed reply".into()));
        }
        if kind == NLMSG_ERROR && (seq0..=last).contains(&seq) {
            if len < 20 {
                return Err(apply_err("malformed acknowledgement".into()));
            }
            let code = word(at + 16) as i32;
            if code != 0 {
                // Errors on the batch markers count too: the whole batch was refused.
                let err = io::Error::from_raw_os_error(code.saturating_neg());
                return Err(apply_err(format!("the kernel refused the batch: {err}")));
            }
            acks += 1;
        }
        // Messages are 4-byte aligned; the last one may end without padding.
        at = at.saturating_add((len + 3) & !3).min(reply.len());
    }
    Ok(acks)
}

/// A netlink socket for nfnetlink, closed on drop.
struct Socket(i32);

impl Socket {
    fn open() -> io::Result<Socket> {
        // SAFETY: plain socket(2); the descriptor is owned by the returned value.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                NETLINK_NETFILTER,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let s = Socket(fd);
        // A reply that never comes must not hang a sync.
        let tv = libc::timeval {
            tv_sec: 10,
            tv_usec: 0,
        };
        // SAFETY: setsockopt with a valid pointer to a timeval of the size given.
        let rc = unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(s)
    }

    fn send(&self, data: &[u8]) -> io::Result<()> {
        // SAFETY: sockaddr_nl zeroed is a valid address for the kernel (pid 0).
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        // SAFETY: the buffer and address are valid for the call's duration.
        let rc = unsafe {
            libc::sendto(
                self.0,
                data.as_ptr().cast(),
                data.len(),
                0,
                (&addr as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        if rc as usize != data.len() {
            return Err(io::Error::other("short send"));
        }
        Ok(())
    }

    fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: the buffer is valid for writes of its length.
        let rc = unsafe { libc::recv(self.0, buf.as_mut_ptr().cast(), buf.len(), 0) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(rc as usize)
    }
}

impl Drop for Socket {
    fn drop(&mut self) {
        // SAFETY: we own the descriptor.
        unsafe {
            libc::close(self.0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_use_the_kernel_register_layout() {
        let k = vec![
            Value::Addr("10.1.2.3".parse().unwrap()),
            Value::Proto(crate::model::Protocol::Udp),
            Value::Port(53),
            Value::Int(7),
        ];
        let mut want = vec![10, 1, 2, 3, 17, 0, 0, 0, 0, 53, 0, 0];
        want.extend_from_slice(&7u32.to_ne_bytes());
        assert_eq!(encode_key(&k).unwrap(), want);
    }

    #[test]
    fn only_element_operations_on_plain_sets_go_through_netlink() {
        let add = Op::AddElements("hairpin-connections".into(), Vec::new());
        assert!(supports(std::slice::from_ref(&add)));
        assert!(!supports(&[Op::AddElements(
            FIREWALL_ALLOW.into(),
            Vec::new()
        )]));
        assert!(!supports(&[add, Op::FlushChain("x".into())]));
        assert!(!supports(&[]));
    }

    fn reply(kind: u16, seq: u32, code: i32) -> Vec<u8> {
        let mut m = Vec::new();
        m.extend_from_slice(&36u32.to_ne_bytes());
        m.extend_from_slice(&kind.to_ne_bytes());
        m.extend_from_slice(&0u16.to_ne_bytes());
        m.extend_from_slice(&seq.to_ne_bytes());
        m.extend_from_slice(&0u32.to_ne_bytes());
        m.extend_from_slice(&code.to_ne_bytes());
        m.extend_from_slice(&[0u8; 16]); // the echoed request header
        m
    }

    #[test]
    fn acknowledgements_are_counted_only_for_our_sequence_numbers() {
        let mut r = reply(NLMSG_ERROR, 101, 0);
        r.extend(reply(NLMSG_ERROR, 102, 0));
        r.extend(reply(NLMSG_ERROR, 7, 0)); // someone else's
        r.extend(reply(3, 101, 0)); // NLMSG_DONE, not an ack
        assert_eq!(read_acks(&r, 100, 103).unwrap(), 2);
        assert_eq!(read_acks(&[], 100, 103).unwrap(), 0);
    }

    #[test]
    fn a_refusal_names_the_errno_even_on_a_batch_marker() {
        let mut r = reply(NLMSG_ERROR, 101, 0);
        r.extend(reply(NLMSG_ERROR, 100, -libc::ENOENT));
        let e = read_acks(&r, 100, 103).unwrap_err().to_string();
        assert!(e.contains("No such file"), "{e}");
    }

    #[test]
    fn a_length_past_the_datagram_is_malformed() {
        let mut r = reply(NLMSG_ERROR, 101, 0);
        r[0] = 200;
        assert!(read_acks(&r, 100, 103).is_err());
        r[0] = 8;
        assert!(read_acks(&r, 100, 103).is_err());
    }

    #[test]
    fn a_batch_is_framed_and_every_message_aligned() {
        let ops = vec![Op::AddElements(
            "service-ips".into(),
            vec![(
                vec![
                    Value::Addr("10.0.0.1".parse().unwrap()),
                    Value::Proto(crate::model::Protocol::Tcp),
                    Value::Port(80),
                ],
                Some(Data::Goto("endpoints-3".into())),
            )],
        )];
        let (b, messages, last) = encode(IpFamily::V4, "kproxy", &ops, 100).unwrap();
        assert_eq!((messages, last), (1, 102));
        let mut at = 0;
        let mut kinds = Vec::new();
        while at < b.len() {
            let len = u32::from_ne_bytes(b[at..at + 4].try_into().unwrap()) as usize;
            kinds.push(u16::from_ne_bytes(b[at + 4..at + 6].try_into().unwrap()));
            assert_eq!(len % 4, 0);
            at += len;
        }
        assert_eq!(at, b.len());
        assert_eq!(
            kinds,
            [
                NFNL_MSG_BATCH_BEGIN,
                (10 << 8) | NFT_MSG_NEWSETELEM,
                NFNL_MSG_BATCH_END
            ]
        );
    }
}
