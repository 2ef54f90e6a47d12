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
use crate::netlink::{messages, Msg, Socket, NLA_F_NESTED, NLMSG_ERROR, NLM_F_ACK, NLM_F_REQUEST};
use std::io;

const NETLINK_NETFILTER: i32 = 12;
const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
const NFNL_MSG_BATCH_END: u16 = 0x11;
const NFT_MSG_NEWSETELEM: u16 = 12;
const NFT_MSG_DELSETELEM: u16 = 14;
const NLM_F_CREATE: u16 = 0x400;
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
    // Elements of an interval set, and prefixes anywhere, need a start and an end key; nft
    // computes them, so those transactions go through it. (An exact key sent alone to the
    // interval set is taken by the kernel as half of a range: the differential test found it.)
    let exact = |k: &Key| !k.iter().any(|v| matches!(v, Value::Cidr(_)));
    let mut n = 0;
    !ops.is_empty()
        && ops.iter().all(|op| match op {
            Op::AddElements(set, e) => {
                n += e.len();
                set != FIREWALL_ALLOW && e.iter().all(|(k, _)| exact(k))
            }
            Op::DeleteElements(set, k) => {
                n += k.len();
                set != FIREWALL_ALLOW && k.iter().all(exact)
            }
            _ => false,
        })
        && n <= MAX_ELEMENTS
}

/// A netfilter message: the netlink header, then nfgenmsg (family, version, resource id).
fn nf_msg(kind: u16, flags: u16, seq: u32, family: u8, res_id: u16) -> Msg {
    let mut m = Msg::new(kind, flags, seq);
    m.raw(&[family, 0]);
    m.raw(&res_id.to_be_bytes());
    m
}

/// A key or map value in the kernel's register layout: each component padded to 4 bytes;
/// addresses and ports in network order, numgen integers in host order.
fn encode_key(key: &[Value]) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(key.len() * 8);
    for v in key {
        match v {
            Value::Addr(std::net::IpAddr::V4(a)) => out.extend_from_slice(&a.octets()),
            Value::Addr(std::net::IpAddr::V6(a)) => out.extend_from_slice(&a.octets()),
            Value::Proto(p) => out.extend_from_slice(&[p.number(), 0, 0, 0]),
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

fn element(m: &mut Msg, key: &Key, data: Option<&Data>) -> Result<()> {
    let e = m.begin(NFTA_LIST_ELEM | NLA_F_NESTED);
    let k = m.begin(NFTA_SET_ELEM_KEY | NLA_F_NESTED);
    m.attr(NFTA_DATA_VALUE, &encode_key(key)?);
    m.end(k);
    if let Some(d) = data {
        let dd = m.begin(NFTA_SET_ELEM_DATA | NLA_F_NESTED);
        match d {
            Data::Dnat(ip, port) => m.attr(
                NFTA_DATA_VALUE,
                &encode_key(&[Value::Addr(*ip), Value::Port(*port)])?,
            ),
            Data::Drop | Data::Goto(_) => {
                let v = m.begin(NFTA_DATA_VERDICT | NLA_F_NESTED);
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
    let mut out = nf_msg(
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
            let mut m = nf_msg((NFNL_SUBSYS_NFTABLES << 8) | kind, flags, seq, fam, 0);
            m.str_attr(NFTA_SET_ELEM_LIST_TABLE, table);
            m.str_attr(NFTA_SET_ELEM_LIST_SET, set);
            let list = m.begin(NFTA_SET_ELEM_LIST_ELEMENTS | NLA_F_NESTED);
            for (k, d) in chunk {
                element(&mut m, k, *d)?;
            }
            m.end(list);
            out.extend(m.finish());
        }
    }
    seq += 1;
    out.extend(
        nf_msg(
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

fn apply_err(message: String, errno: Option<i32>) -> Error {
    Error::Netlink {
        op: "nfnetlink batch",
        errno,
        message,
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
    let sock = Socket::open(NETLINK_NETFILTER, std::time::Duration::from_secs(10))
        .map_err(|e| apply_err(format!("socket: {e}"), e.raw_os_error()))?;
    sock.send(&batch)
        .map_err(|e| apply_err(format!("send: {e}"), e.raw_os_error()))?;
    // One acknowledgement per element message (the batch markers get none).
    let mut pending = messages;
    let mut buf = vec![0u8; 64 * 1024];
    while pending > 0 {
        let n = sock
            .recv(&mut buf)
            .map_err(|e| apply_err(format!("recv: {e}"), e.raw_os_error()))?;
        pending = pending.saturating_sub(read_acks(&buf[..n], seq0, last)?);
    }
    Ok(batch.len())
}

/// Read one datagram of replies to a batch sent with sequence numbers `seq0..=last`: the
/// number of successful acknowledgements in it, or the kernel's refusal. Replies to other
/// requests are ignored; a message whose length does not fit the datagram is an error, so
/// nothing past it is trusted. Pure, so the fuzz tests can feed it anything.
pub fn read_acks(reply: &[u8], seq0: u32, last: u32) -> Result<usize> {
    let mut acks = 0;
    for m in messages(reply).map_err(|e| apply_err(e, None))? {
        if m.kind != NLMSG_ERROR || !(seq0..=last).contains(&m.seq) {
            continue;
        }
        let code = m
            .error_code()
            .ok_or_else(|| apply_err("malformed acknowledgement".into(), None))?;
        if code != 0 {
            // Errors on the batch markers count too: the whole batch was refused.
            let err = io::Error::from_raw_os_error(code);
            return Err(apply_err(
                format!("the kernel refused the batch: {err}"),
                Some(code),
            ));
        }
        acks += 1;
    }
    Ok(acks)
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
        let e = read_acks(&r, 100, 103).unwrap_err();
        assert!(e.to_string().contains("No such file"), "{e}");
        assert!(
            matches!(
                e,
                Error::Netlink {
                    errno: Some(libc::ENOENT),
                    ..
                }
            ),
            "{e:?}"
        );
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
