//! An IPVS table in memory with the kernel's answers (ip_vs_ctl.c): adding what exists is
//! EEXIST, touching a virtual server that does not exist is ESRCH, a real server that does not
//! exist ENOENT. Each operation stands alone, as each message of a netlink batch does.

use super::{Backend, Dest, DestKey, Op, Outcome, Table, Virtual, VirtualKey};
use crate::error::Result;
use std::collections::BTreeMap;
use std::collections::BTreeSet;

#[derive(Debug, Default)]
pub struct Fake {
    pub table: Table,
    /// Operations on these virtual servers are refused with EINVAL (fault injection).
    pub refuse: BTreeSet<VirtualKey>,
    /// Every operation applied, in order (refused ones too).
    pub log: Vec<Op>,
}

impl Fake {
    fn one(&mut self, op: &Op) -> std::result::Result<(), i32> {
        if self.refuse.contains(&op.key()) {
            return Err(libc::EINVAL);
        }
        let t = &mut self.table;
        match op {
            Op::AddService(k, s) => {
                if t.contains_key(k) {
                    return Err(libc::EEXIST);
                }
                t.insert(
                    *k,
                    Virtual {
                        service: s.clone(),
                        dests: Default::default(),
                    },
                );
            }
            Op::SetService(k, s) => t.get_mut(k).ok_or(libc::ESRCH)?.service = s.clone(),
            Op::DelService(k) => {
                t.remove(k).ok_or(libc::ESRCH)?;
            }
            Op::AddDest(k, d, w) => {
                let v = t.get_mut(k).ok_or(libc::ESRCH)?;
                if v.dests.contains_key(d) {
                    return Err(libc::EEXIST);
                }
                v.dests.insert(*d, Dest::weighted(*w));
            }
            Op::SetDest(k, d, w) => {
                let v = t.get_mut(k).ok_or(libc::ESRCH)?;
                v.dests.get_mut(d).ok_or(libc::ENOENT)?.weight = *w;
            }
            Op::DelDest(k, d) => {
                let v = t.get_mut(k).ok_or(libc::ESRCH)?;
                v.dests.remove(d).ok_or(libc::ENOENT)?;
            }
        }
        Ok(())
    }
}

impl Backend for Fake {
    fn apply(&mut self, ops: &[Op]) -> Result<Outcome> {
        let mut out = Outcome {
            sent: ops.len(),
            messages_per_send: vec![ops.len()],
            refused: Vec::new(),
        };
        for (i, op) in ops.iter().enumerate() {
            self.log.push(op.clone());
            if let Err(errno) = self.one(op) {
                out.refused.push((i, errno));
            }
        }
        Ok(out)
    }

    fn dests(&mut self, k: &VirtualKey) -> Result<BTreeMap<DestKey, Dest>> {
        Ok(self
            .table
            .get(k)
            .map(|v| v.dests.clone())
            .unwrap_or_default())
    }

    fn dump(&mut self, v6: bool) -> Result<Table> {
        Ok(self
            .table
            .iter()
            .filter(|(k, _)| k.addr.is_ipv6() == v6)
            .map(|(k, v)| (*k, v.clone()))
            .collect())
    }
}
