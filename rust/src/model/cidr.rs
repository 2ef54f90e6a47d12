//! [`Cidr`]: an IP prefix such as `10.244.0.0/16`.

use serde::Deserialize;
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

/// An address prefix. The address is stored masked, so `10.1.2.3/8` prints as `10.0.0.0/8`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(try_from = "String")]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    fn bits(addr: &IpAddr) -> (u128, u8) {
        match addr {
            IpAddr::V4(a) => (u128::from(u32::from(*a)), 32),
            IpAddr::V6(a) => (u128::from(*a), 128),
        }
    }

    fn mask(prefix: u8, width: u8) -> u128 {
        if prefix == 0 {
            0
        } else {
            let all = if width == 32 {
                u128::from(u32::MAX)
            } else {
                u128::MAX
            };
            all & !((1u128 << (width - prefix)) - 1) & all
        }
    }

    /// `addr/prefix`, masked; None when the prefix is longer than the address.
    pub fn new(addr: IpAddr, prefix: u8) -> Option<Cidr> {
        let (bits, width) = Cidr::bits(&addr);
        if prefix > width {
            return None;
        }
        let masked = bits & Cidr::mask(prefix, width);
        let addr = match addr {
            IpAddr::V4(_) => IpAddr::V4((masked as u32).into()),
            IpAddr::V6(_) => IpAddr::V6(masked.into()),
        };
        Some(Cidr { addr, prefix })
    }

    /// The prefix of one address (`/32` or `/128`).
    pub fn host(addr: IpAddr) -> Cidr {
        let (_, width) = Cidr::bits(&addr);
        Cidr {
            addr,
            prefix: width,
        }
    }

    /// The first and last address of the prefix as integers (IPv4 in the low 32 bits).
    pub fn range(&self) -> (u128, u128) {
        let (net, width) = Cidr::bits(&self.addr);
        let span = if width - self.prefix >= 128 {
            u128::MAX
        } else {
            (1u128 << (width - self.prefix)) - 1
        };
        (net, net | span)
    }

    /// Whether every address of `other` is in this prefix.
    pub fn covers(&self, other: &Cidr) -> bool {
        self.prefix <= other.prefix && self.contains(&other.addr)
    }

    /// The prefix one bit shorter that holds this one; None for `/0`.
    fn parent(&self) -> Option<Cidr> {
        let p = self.prefix.checked_sub(1)?;
        Cidr::new(self.addr, p)
    }

    pub fn contains(&self, ip: &IpAddr) -> bool {
        if self.addr.is_ipv4() != ip.is_ipv4() {
            return false;
        }
        let (net, width) = Cidr::bits(&self.addr);
        let (x, _) = Cidr::bits(ip);
        let m = Cidr::mask(self.prefix, width);
        x & m == net & m
    }
}

/// The fewest prefixes that cover exactly the addresses of `cidrs` (one family or both):
/// prefixes inside another are dropped and sibling halves merge into their parent, so no two
/// results overlap. Interval sets need this: the kernel refuses an element whose start or end
/// falls inside one it already holds (`0.0.0.0/0` beside any range, for example).
pub fn aggregate(cidrs: impl IntoIterator<Item = Cidr>) -> Vec<Cidr> {
    let mut sorted: Vec<Cidr> = cidrs.into_iter().collect();
    // Families apart, then by first address, containers before what they contain.
    sorted.sort_by_key(|c| (c.addr.is_ipv6(), c.range().0, c.prefix));
    let mut out: Vec<Cidr> = Vec::with_capacity(sorted.len());
    for c in sorted {
        // Prefixes nest or are disjoint; in this order a container of `c` is the last kept.
        if out.last().is_some_and(|last| last.covers(&c)) {
            continue;
        }
        out.push(c);
        // Two halves of one parent become the parent, which may complete another pair.
        while out.len() >= 2 {
            let (a, b) = (out[out.len() - 2], out[out.len() - 1]);
            match (a.parent(), b.parent()) {
                (Some(pa), Some(pb)) if pa == pb && a.prefix == b.prefix && a != b => {
                    out.truncate(out.len() - 2);
                    out.push(pa);
                }
                _ => break,
            }
        }
    }
    out
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (a, p) = s
            .split_once('/')
            .ok_or_else(|| format!("{s:?} is not a CIDR"))?;
        let addr: IpAddr = a.parse().map_err(|_| format!("{s:?} is not a CIDR"))?;
        let prefix: u8 = p.parse().map_err(|_| format!("{s:?} is not a CIDR"))?;
        Cidr::new(addr, prefix).ok_or_else(|| format!("{s:?} is not a CIDR"))
    }
}

impl TryFrom<String> for Cidr {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_masks_and_contains() {
        let c: Cidr = "10.244.3.7/16".parse().unwrap();
        assert_eq!(c.to_string(), "10.244.0.0/16");
        assert!(c.contains(&"10.244.200.1".parse().unwrap()));
        assert!(!c.contains(&"10.245.0.1".parse().unwrap()));
        assert!(!c.contains(&"fd00::1".parse().unwrap()));
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains(&"1.2.3.4".parse().unwrap()));
        let v6: Cidr = "fd00:10:244::/48".parse().unwrap();
        assert!(v6.contains(&"fd00:10:244:1::2".parse().unwrap()));
        assert!(!v6.contains(&"fd00:10:245::2".parse().unwrap()));
        let host: Cidr = "10.0.0.1/32".parse().unwrap();
        assert!(host.contains(&"10.0.0.1".parse().unwrap()));
    }

    fn cidrs(list: &[&str]) -> Vec<Cidr> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn aggregate_drops_nested_and_merges_halves() {
        let agg = |l: &[&str]| -> Vec<String> {
            aggregate(cidrs(l))
                .iter()
                .map(ToString::to_string)
                .collect()
        };
        assert_eq!(
            agg(&["10.1.0.0/16", "0.0.0.0/0", "10.0.0.0/8"]),
            ["0.0.0.0/0"]
        );
        assert_eq!(
            agg(&["192.168.77.0/24", "192.168.77.200/32"]),
            ["192.168.77.0/24"]
        );
        assert_eq!(
            agg(&["10.0.0.0/24", "10.0.1.0/24", "10.0.2.0/24"]),
            ["10.0.0.0/23", "10.0.2.0/24"]
        );
        assert_eq!(agg(&["0.0.0.0/1", "128.0.0.0/1"]), ["0.0.0.0/0"]);
        assert_eq!(agg(&["10.0.0.1/32", "10.0.0.1/32"]), ["10.0.0.1/32"]);
        assert_eq!(
            agg(&["::/0", "0.0.0.0/0", "fd00::/8"]),
            ["0.0.0.0/0", "::/0"]
        );
        assert!(aggregate(Vec::new()).is_empty());
    }

    #[test]
    fn aggregate_is_exact_and_disjoint() {
        use proptest::prelude::*;
        let v4 = (any::<u32>(), 20u8..=32)
            .prop_map(|(a, p)| Cidr::new(IpAddr::V4(a.into()), p).unwrap());
        proptest!(|(list in proptest::collection::vec(v4, 0..12), probe in any::<u32>())| {
            // Confine the prefixes to a /20 so that they meet often.
            let list: Vec<Cidr> = list.iter().map(|c| {
                let (lo, _) = c.range();
                let a = (lo as u32 & 0x0000_0fff) | 0x0a00_0000;
                Cidr::new(IpAddr::V4(a.into()), c.prefix().max(20)).unwrap()
            }).collect();
            let agg = aggregate(list.clone());
            for (i, a) in agg.iter().enumerate() {
                for b in &agg[i + 1..] {
                    let ((a0, a1), (b0, b1)) = (a.range(), b.range());
                    prop_assert!(a1 < b0 || b1 < a0, "{a} overlaps {b}");
                }
            }
            // Same addresses: a random one, and either side of every edge.
            let mut probes = vec![u128::from((probe & 0x0000_0fff) | 0x0a00_0000)];
            for c in list.iter().chain(&agg) {
                let (lo, hi) = c.range();
                probes.extend([lo - 1, lo, hi, hi + 1]);
            }
            for p in probes {
                let ip = IpAddr::V4((p as u32).into());
                prop_assert_eq!(
                    list.iter().any(|c| c.contains(&ip)),
                    agg.iter().any(|c| c.contains(&ip)),
                    "{}", ip
                );
            }
            prop_assert!(agg.len() <= list.len());
        });
    }

    #[test]
    fn rejects_garbage() {
        for bad in [
            "10.0.0.0",
            "10.0.0.0/33",
            "x/8",
            "10.0.0.0/-1",
            "::/129",
            "10.0.0.0/8\n-A",
        ] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad}");
        }
    }
}
