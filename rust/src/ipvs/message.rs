//! IPVS generic netlink messages (include/uapi/linux/ip_vs.h), encoded as the kernel's
//! `ip_vs_ctl.c` parses them and decoded as it dumps them.
//!
//! Addresses travel as 16 bytes (`union nf_inet_addr`, IPv4 in the first four), ports and the
//! IPv4 netmask in network order, everything else in host order. Nests carry no NLA_F_NESTED
//! flag: the kernel neither needs nor sets it for IPVS.

use super::{Dest, DestKey, Op, Service, Table, Virtual, VirtualKey, F_HASHED};
use crate::model::Protocol;
use crate::netlink::{attrs, get_u16, get_u32, Msg, NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

pub const GENL_ID_CTRL: u16 = 0x10;
pub const CTRL_CMD_GETFAMILY: u8 = 3;
pub const CTRL_ATTR_FAMILY_ID: u16 = 1;
pub const CTRL_ATTR_FAMILY_NAME: u16 = 2;
pub const FAMILY_NAME: &str = "IPVS";
const VERSION: u8 = 1;

pub const CMD_NEW_SERVICE: u8 = 1;
pub const CMD_SET_SERVICE: u8 = 2;
pub const CMD_DEL_SERVICE: u8 = 3;
pub const CMD_GET_SERVICE: u8 = 4;
pub const CMD_NEW_DEST: u8 = 5;
pub const CMD_SET_DEST: u8 = 6;
pub const CMD_DEL_DEST: u8 = 7;
pub const CMD_GET_DEST: u8 = 8;
pub const CMD_SET_CONFIG: u8 = 12;

const ATTR_SERVICE: u16 = 1;
const ATTR_DEST: u16 = 2;
const ATTR_TIMEOUT_TCP: u16 = 4;
const ATTR_TIMEOUT_TCP_FIN: u16 = 5;
const ATTR_TIMEOUT_UDP: u16 = 6;

const SVC_AF: u16 = 1;
const SVC_PROTOCOL: u16 = 2;
const SVC_ADDR: u16 = 3;
const SVC_PORT: u16 = 4;
const SVC_SCHED_NAME: u16 = 6;
const SVC_FLAGS: u16 = 7;
const SVC_TIMEOUT: u16 = 8;
const SVC_NETMASK: u16 = 9;

const DEST_ADDR: u16 = 1;
const DEST_PORT: u16 = 2;
const DEST_FWD_METHOD: u16 = 3;
const DEST_WEIGHT: u16 = 4;
const DEST_U_THRESH: u16 = 5;
const DEST_L_THRESH: u16 = 6;
const DEST_ACTIVE_CONNS: u16 = 7;
const DEST_INACT_CONNS: u16 = 8;
const DEST_ADDR_FAMILY: u16 = 11;

/// IP_VS_CONN_F_MASQ: NAT, what a Service proxy needs (pyroute2's default is direct routing).
const FWD_MASQ: u32 = 0;

fn af(addr: &IpAddr) -> u16 {
    match addr {
        IpAddr::V4(_) => libc::AF_INET as u16,
        IpAddr::V6(_) => libc::AF_INET6 as u16,
    }
}

fn addr16(addr: &IpAddr) -> [u8; 16] {
    let mut out = [0u8; 16];
    match addr {
        IpAddr::V4(a) => out[..4].copy_from_slice(&a.octets()),
        IpAddr::V6(a) => out = a.octets(),
    }
    out
}

fn genl(family: u16, cmd: u8, flags: u16, seq: u32) -> Msg {
    let mut m = Msg::new(family, flags, seq);
    m.raw(&[cmd, VERSION, 0, 0]);
    m
}

/// The family lookup: the reply carries the id every IPVS message is sent to.
pub fn get_family(seq: u32) -> Vec<u8> {
    let mut m = Msg::new(GENL_ID_CTRL, NLM_F_REQUEST | NLM_F_ACK, seq);
    m.raw(&[CTRL_CMD_GETFAMILY, 1, 0, 0]);
    m.str_attr(CTRL_ATTR_FAMILY_NAME, FAMILY_NAME);
    m.finish()
}

/// The family id from a CTRL_CMD_NEWFAMILY reply's payload.
pub fn family_id(payload: &[u8]) -> Option<u16> {
    attrs(payload.get(4..)?)
        .into_iter()
        .find(|(k, _)| *k == CTRL_ATTR_FAMILY_ID)
        .and_then(|(_, v)| get_u16(v))
}

fn service_ident(m: &mut Msg, k: &VirtualKey) {
    m.u16_attr(SVC_AF, af(&k.addr));
    m.u16_attr(SVC_PROTOCOL, u16::from(k.protocol.number()));
    m.attr(SVC_ADDR, &addr16(&k.addr));
    m.attr(SVC_PORT, &k.port.to_be_bytes());
}

fn service_nest(m: &mut Msg, k: &VirtualKey, full: Option<&Service>) {
    let nest = m.begin(ATTR_SERVICE);
    service_ident(m, k);
    if let Some(s) = full {
        m.str_attr(SVC_SCHED_NAME, &s.scheduler);
        let mut flags = [0u8; 8];
        flags[..4].copy_from_slice(&(s.flags & !F_HASHED).to_ne_bytes());
        flags[4..].copy_from_slice(&u32::MAX.to_ne_bytes()); // mask: set every flag as given
        m.attr(SVC_FLAGS, &flags);
        m.u32_attr(SVC_TIMEOUT, s.timeout);
        match k.addr {
            IpAddr::V4(_) => m.attr(SVC_NETMASK, &[0xff; 4]),
            IpAddr::V6(_) => m.u32_attr(SVC_NETMASK, 128),
        }
    }
    m.end(nest);
}

fn dest_nest(m: &mut Msg, d: &DestKey, weight: Option<u32>) {
    let nest = m.begin(ATTR_DEST);
    m.attr(DEST_ADDR, &addr16(&d.addr));
    m.attr(DEST_PORT, &d.port.to_be_bytes());
    if let Some(w) = weight {
        m.u32_attr(DEST_FWD_METHOD, FWD_MASQ);
        m.u32_attr(DEST_WEIGHT, w);
        m.u32_attr(DEST_U_THRESH, 0);
        m.u32_attr(DEST_L_THRESH, 0);
        m.u16_attr(DEST_ADDR_FAMILY, af(&d.addr));
    }
    m.end(nest);
}

/// One operation as one message.
pub fn encode(op: &Op, family: u16, seq: u32, ack: bool) -> Vec<u8> {
    let flags = NLM_F_REQUEST | if ack { NLM_F_ACK } else { 0 };
    let (cmd, k) = match op {
        Op::AddService(k, _) => (CMD_NEW_SERVICE, k),
        Op::SetService(k, _) => (CMD_SET_SERVICE, k),
        Op::DelService(k) => (CMD_DEL_SERVICE, k),
        Op::AddDest(k, _, _) => (CMD_NEW_DEST, k),
        Op::SetDest(k, _, _) => (CMD_SET_DEST, k),
        Op::DelDest(k, _) => (CMD_DEL_DEST, k),
    };
    let mut m = genl(family, cmd, flags, seq);
    match op {
        Op::AddService(_, s) | Op::SetService(_, s) => service_nest(&mut m, k, Some(s)),
        Op::DelService(_) => service_nest(&mut m, k, None),
        Op::AddDest(_, d, w) | Op::SetDest(_, d, w) => {
            service_nest(&mut m, k, None);
            dest_nest(&mut m, d, Some(*w));
        }
        Op::DelDest(_, d) => {
            service_nest(&mut m, k, None);
            dest_nest(&mut m, d, None);
        }
    }
    m.finish()
}

/// A dump of every virtual server.
pub fn dump_services(family: u16, seq: u32) -> Vec<u8> {
    genl(family, CMD_GET_SERVICE, NLM_F_REQUEST | NLM_F_DUMP, seq).finish()
}

/// A dump of one virtual server's real servers.
pub fn dump_dests(family: u16, seq: u32, k: &VirtualKey) -> Vec<u8> {
    let mut m = genl(family, CMD_GET_DEST, NLM_F_REQUEST | NLM_F_DUMP, seq);
    service_nest(&mut m, k, None);
    m.finish()
}

/// The IPVS connection timeouts (seconds; 0 keeps the kernel's value).
pub fn set_timeouts(family: u16, seq: u32, tcp: u32, tcp_fin: u32, udp: u32) -> Vec<u8> {
    let mut m = genl(family, CMD_SET_CONFIG, NLM_F_REQUEST | NLM_F_ACK, seq);
    m.u32_attr(ATTR_TIMEOUT_TCP, tcp);
    m.u32_attr(ATTR_TIMEOUT_TCP_FIN, tcp_fin);
    m.u32_attr(ATTR_TIMEOUT_UDP, udp);
    m.finish()
}

fn read_addr(family: u16, p: &[u8]) -> Option<IpAddr> {
    if family == libc::AF_INET as u16 {
        let b: [u8; 4] = p.get(..4)?.try_into().ok()?;
        Some(IpAddr::V4(Ipv4Addr::from(b)))
    } else if family == libc::AF_INET6 as u16 {
        let b: [u8; 16] = p.get(..16)?.try_into().ok()?;
        Some(IpAddr::V6(Ipv6Addr::from(b)))
    } else {
        None
    }
}

fn read_port(p: &[u8]) -> Option<u16> {
    Some(u16::from_be_bytes(p.get(..2)?.try_into().ok()?))
}

/// A virtual server from one GET_SERVICE dump message's payload (after the netlink header);
/// `None` for what kproxy never programs (firewall-mark services, unknown protocols).
pub fn decode_service(payload: &[u8]) -> Option<(VirtualKey, Service)> {
    let top = attrs(payload.get(4..)?);
    let (_, nest) = top.into_iter().find(|(k, _)| *k == ATTR_SERVICE)?;
    let (mut fam, mut proto, mut addr, mut port) = (None, None, None, None);
    let mut s = Service {
        scheduler: String::new(),
        flags: 0,
        timeout: 0,
    };
    for (k, v) in attrs(nest) {
        match k {
            SVC_AF => fam = get_u16(v),
            SVC_PROTOCOL => proto = get_u16(v),
            SVC_ADDR => addr = Some(v),
            SVC_PORT => port = read_port(v),
            SVC_SCHED_NAME => {
                let end = v.iter().position(|b| *b == 0).unwrap_or(v.len());
                s.scheduler = String::from_utf8_lossy(&v[..end]).into_owned();
            }
            SVC_FLAGS => s.flags = get_u32(v)? & !F_HASHED,
            SVC_TIMEOUT => s.timeout = get_u32(v)?,
            _ => {}
        }
    }
    let protocol = match proto? {
        6 => Protocol::Tcp,
        17 => Protocol::Udp,
        132 => Protocol::Sctp,
        _ => return None,
    };
    let key = VirtualKey {
        addr: read_addr(fam?, addr?)?,
        protocol,
        port: port?,
    };
    Some((key, s))
}

/// A real server from one GET_DEST dump message's payload.
pub fn decode_dest(payload: &[u8], service_family: u16) -> Option<(DestKey, Dest)> {
    let top = attrs(payload.get(4..)?);
    let (_, nest) = top.into_iter().find(|(k, _)| *k == ATTR_DEST)?;
    let (mut fam, mut addr, mut port) = (service_family, None, None);
    let mut d = Dest::default();
    for (k, v) in attrs(nest) {
        match k {
            DEST_ADDR => addr = Some(v),
            DEST_PORT => port = read_port(v),
            DEST_WEIGHT => d.weight = get_u32(v)?,
            DEST_ACTIVE_CONNS => d.active = get_u32(v)?,
            DEST_INACT_CONNS => d.inactive = get_u32(v)?,
            DEST_ADDR_FAMILY => fam = get_u16(v)?,
            _ => {}
        }
    }
    Some((
        DestKey {
            addr: read_addr(fam, addr?)?,
            port: port?,
        },
        d,
    ))
}

/// The address family a key belongs to, for [`decode_dest`].
pub fn family_of(k: &VirtualKey) -> u16 {
    af(&k.addr)
}

/// Insert a decoded service into a table (dumps list services first, then each one's dests).
pub fn insert_service(t: &mut Table, k: VirtualKey, s: Service) {
    t.insert(
        k,
        Virtual {
            service: s,
            dests: Default::default(),
        },
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        s.split_whitespace()
            .map(|b| u8::from_str_radix(b, 16).unwrap())
            .collect()
    }

    fn vip() -> VirtualKey {
        VirtualKey {
            addr: "10.0.0.1".parse().unwrap(),
            protocol: Protocol::Tcp,
            port: 80,
        }
    }

    fn rr() -> Service {
        Service {
            scheduler: "rr".into(),
            flags: 0,
            timeout: 0,
        }
    }

    /// NEW_SERVICE TCP 10.0.0.1:80 rr: the bytes ipvsadm's encoder and the kernel's parser
    /// agree on (ip_vs.h attribute numbers; family id 0x24 for the example).
    #[test]
    #[cfg(target_endian = "little")]
    fn new_service_is_byte_exact() {
        let want = hex("68 00 00 00 24 00 05 00 01 00 00 00 00 00 00 00 \
             01 01 00 00 \
             54 00 01 00 \
             06 00 01 00 02 00 00 00 \
             06 00 02 00 06 00 00 00 \
             14 00 03 00 0a 00 00 01 00 00 00 00 00 00 00 00 00 00 00 00 \
             06 00 04 00 00 50 00 00 \
             07 00 06 00 72 72 00 00 \
             0c 00 07 00 00 00 00 00 ff ff ff ff \
             08 00 08 00 00 00 00 00 \
             08 00 09 00 ff ff ff ff");
        assert_eq!(encode(&Op::AddService(vip(), rr()), 0x24, 1, true), want);
    }

    #[test]
    #[cfg(target_endian = "little")]
    fn new_dest_is_byte_exact() {
        let want = hex("8c 00 00 00 24 00 05 00 02 00 00 00 00 00 00 00 \
             05 01 00 00 \
             30 00 01 00 \
             06 00 01 00 02 00 00 00 \
             06 00 02 00 06 00 00 00 \
             14 00 03 00 0a 00 00 01 00 00 00 00 00 00 00 00 00 00 00 00 \
             06 00 04 00 00 50 00 00 \
             48 00 02 00 \
             14 00 01 00 0a f4 01 02 00 00 00 00 00 00 00 00 00 00 00 00 \
             06 00 02 00 1f 90 00 00 \
             08 00 03 00 00 00 00 00 \
             08 00 04 00 01 00 00 00 \
             08 00 05 00 00 00 00 00 \
             08 00 06 00 00 00 00 00 \
             06 00 0b 00 02 00 00 00");
        let d = DestKey {
            addr: "10.244.1.2".parse().unwrap(),
            port: 8080,
        };
        assert_eq!(encode(&Op::AddDest(vip(), d, 1), 0x24, 2, true), want);
    }

    #[test]
    #[cfg(target_endian = "little")]
    fn family_lookup_is_byte_exact() {
        let want = hex("20 00 00 00 10 00 05 00 01 00 00 00 00 00 00 00 \
             03 01 00 00 \
             09 00 02 00 49 50 56 53 00 00 00 00");
        assert_eq!(get_family(1), want);
    }

    #[test]
    fn persistence_and_ipv6_netmask() {
        let k = VirtualKey {
            addr: "fd00::10".parse().unwrap(),
            protocol: Protocol::Udp,
            port: 53,
        };
        let s = Service {
            scheduler: "mh".into(),
            flags: super::super::F_PERSISTENT,
            timeout: 10800,
        };
        let bytes = encode(&Op::SetService(k, s.clone()), 0x24, 9, false);
        let msgs = crate::netlink::messages(&bytes).unwrap();
        assert_eq!(msgs[0].flags, NLM_F_REQUEST); // no ack asked
        let nest = attrs(&msgs[0].payload[4..])[0].1;
        let found: std::collections::BTreeMap<u16, Vec<u8>> = attrs(nest)
            .into_iter()
            .map(|(k, v)| (k, v.to_vec()))
            .collect();
        assert_eq!(found[&SVC_NETMASK], 128u32.to_ne_bytes());
        assert_eq!(found[&SVC_TIMEOUT], 10800u32.to_ne_bytes());
        assert_eq!(found[&SVC_AF], 10u16.to_ne_bytes());
        // And it reads back as it was written (a dump message has the same layout).
        assert_eq!(decode_service(msgs[0].payload), Some((k, s)));
    }

    #[test]
    fn dests_decode_with_their_connection_counts() {
        let d = DestKey {
            addr: "10.244.1.2".parse().unwrap(),
            port: 8080,
        };
        let mut bytes = encode(&Op::SetDest(vip(), d, 0), 0x24, 3, true);
        let msgs = crate::netlink::messages(&bytes).unwrap();
        assert_eq!(
            decode_dest(msgs[0].payload, 2),
            Some((d, Dest::weighted(0)))
        );
        // The kernel adds the connection counters to what it lists.
        let mut m = genl(0x24, CMD_NEW_DEST, 0, 3);
        let nest = m.begin(ATTR_DEST);
        m.attr(DEST_ADDR, &addr16(&d.addr));
        m.attr(DEST_PORT, &d.port.to_be_bytes());
        m.u32_attr(DEST_WEIGHT, 1);
        m.u32_attr(DEST_ACTIVE_CONNS, 4);
        m.u32_attr(DEST_INACT_CONNS, 2);
        m.end(nest);
        bytes = m.finish();
        let msgs = crate::netlink::messages(&bytes).unwrap();
        let (_, got) = decode_dest(msgs[0].payload, 2).unwrap();
        assert_eq!((got.weight, got.active, got.inactive), (1, 4, 2));
    }
}
