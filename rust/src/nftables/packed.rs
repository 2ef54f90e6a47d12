//! Set element keys packed into a few bytes, for the writer's long-lived bookkeeping.
//!
//! A cluster of 30,000 Services has about 300,000 set elements, and the writer remembers every
//! one of them (who claims it, with what data). As a `Vec<Value>` a key costs a heap block of
//! 60-100 bytes plus its header; packed, a key of IPv4 values fits inline in 32 bytes (IPv6 keys spill to one small heap block).
//!
//! Each value is a tag byte and a big-endian payload whose length the tag fixes, so comparing
//! packed keys byte by byte orders them exactly as comparing the values would: the sets are
//! written in the same order either way.

use super::ast::{Key, Value};
use crate::model::{Cidr, Protocol};
use smallvec::SmallVec;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Tags in the order of [`Value`]'s variants (and IPv4 before IPv6, as [`IpAddr`] orders).
const ADDR4: u8 = 0;
const ADDR6: u8 = 1;
const CIDR4: u8 = 2;
const CIDR6: u8 = 3;
const PROTO: u8 = 4;
const PORT: u8 = 5;
const INT: u8 = 6;

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PackedKey(SmallVec<[u8; 24]>);

impl PackedKey {
    pub fn pack(key: &[Value]) -> PackedKey {
        let mut b = SmallVec::new();
        for v in key {
            match v {
                Value::Addr(IpAddr::V4(a)) => {
                    b.push(ADDR4);
                    b.extend_from_slice(&a.octets());
                }
                Value::Addr(IpAddr::V6(a)) => {
                    b.push(ADDR6);
                    b.extend_from_slice(&a.octets());
                }
                Value::Cidr(c) => {
                    match c.addr() {
                        IpAddr::V4(a) => {
                            b.push(CIDR4);
                            b.extend_from_slice(&a.octets());
                        }
                        IpAddr::V6(a) => {
                            b.push(CIDR6);
                            b.extend_from_slice(&a.octets());
                        }
                    }
                    b.push(c.prefix());
                }
                Value::Proto(p) => {
                    b.push(PROTO);
                    b.push(*p as u8);
                }
                Value::Port(p) => {
                    b.push(PORT);
                    b.extend_from_slice(&p.to_be_bytes());
                }
                Value::Int(i) => {
                    b.push(INT);
                    b.extend_from_slice(&i.to_be_bytes());
                }
            }
        }
        PackedKey(b)
    }

    /// The values back. Only [`PackedKey::pack`] makes these bytes, so they always decode.
    pub fn unpack(&self) -> Key {
        let b = &self.0[..];
        let mut out = Vec::with_capacity(4);
        let mut at = 0;
        let take = |at: &mut usize, n: usize| -> &[u8] {
            let s = &b[*at..*at + n];
            *at += n;
            s
        };
        while at < b.len() {
            let tag = b[at];
            at += 1;
            let v = match tag {
                ADDR4 | CIDR4 => {
                    let o: [u8; 4] = take(&mut at, 4).try_into().unwrap_or_default();
                    Value::Addr(IpAddr::V4(Ipv4Addr::from(o)))
                }
                ADDR6 | CIDR6 => {
                    let o: [u8; 16] = take(&mut at, 16).try_into().unwrap_or_default();
                    Value::Addr(IpAddr::V6(Ipv6Addr::from(o)))
                }
                PROTO => Value::Proto(match take(&mut at, 1)[0] {
                    0 => Protocol::Tcp,
                    1 => Protocol::Udp,
                    _ => Protocol::Sctp,
                }),
                PORT => Value::Port(u16::from_be_bytes(
                    take(&mut at, 2).try_into().unwrap_or_default(),
                )),
                _ => Value::Int(u32::from_be_bytes(
                    take(&mut at, 4).try_into().unwrap_or_default(),
                )),
            };
            let v = match (tag, v) {
                (CIDR4 | CIDR6, Value::Addr(a)) => {
                    let prefix = take(&mut at, 1)[0];
                    // Packed from a valid Cidr: the prefix fits its address.
                    Value::Cidr(Cidr::new(a, prefix).unwrap_or_else(|| Cidr::new(a, 0).unwrap()))
                }
                (_, v) => v,
            };
            out.push(v);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn value() -> impl Strategy<Value = Value> {
        prop_oneof![
            any::<[u8; 4]>().prop_map(|o| Value::Addr(IpAddr::from(o))),
            any::<[u8; 16]>().prop_map(|o| Value::Addr(IpAddr::from(o))),
            (any::<[u8; 4]>(), 0u8..=32)
                .prop_map(|(o, p)| Value::Cidr(Cidr::new(IpAddr::from(o), p).unwrap())),
            (any::<[u8; 16]>(), 0u8..=128)
                .prop_map(|(o, p)| Value::Cidr(Cidr::new(IpAddr::from(o), p).unwrap())),
            prop::sample::select(vec![Protocol::Tcp, Protocol::Udp, Protocol::Sctp])
                .prop_map(Value::Proto),
            any::<u16>().prop_map(Value::Port),
            any::<u32>().prop_map(Value::Int),
        ]
    }

    proptest! {
        #[test]
        fn packing_round_trips(key in prop::collection::vec(value(), 0..5)) {
            prop_assert_eq!(PackedKey::pack(&key).unpack(), key);
        }

        /// Elements are written in the same order as before packing.
        #[test]
        fn packing_keeps_the_order(
            a in prop::collection::vec(value(), 0..4),
            b in prop::collection::vec(value(), 0..4),
        ) {
            prop_assert_eq!(PackedKey::pack(&a).cmp(&PackedKey::pack(&b)), a.cmp(&b));
        }
    }

    #[test]
    fn an_ipv4_endpoint_key_stays_inline() {
        let k = PackedKey::pack(&[
            Value::Addr("10.0.0.1".parse().unwrap()),
            Value::Proto(Protocol::Tcp),
            Value::Port(80),
            Value::Int(3),
        ]);
        assert!(!k.0.spilled());
        assert_eq!(std::mem::size_of::<PackedKey>(), 32);
    }
}
