//! The operations that turn one IPVS table into another, in an order the kernel accepts:
//! new virtual servers, then their real servers; changed virtual servers and weights; then
//! removed real servers; removed virtual servers last.
//!
//! Graceful termination, as upstream: a TCP real server that leaves while it still carries
//! connections is first set to weight 0 (no new connections) and deleted once its
//! connections are gone; UDP and SCTP real servers are deleted at once (with
//! `expire_nodest_conn`, their flows end on the next packet).

use super::{Op, Table};
use crate::model::Protocol;

/// From `have` (what the kernel holds, with connection counts where known) to `want`.
pub fn plan(want: &Table, have: &Table) -> Vec<Op> {
    let mut add_services = Vec::new();
    let mut add_dests = Vec::new();
    let mut changes = Vec::new();
    let mut del_dests = Vec::new();
    let mut del_services = Vec::new();
    for (k, w) in want {
        match have.get(k) {
            None => {
                add_services.push(Op::AddService(*k, w.service.clone()));
                for (d, dest) in &w.dests {
                    add_dests.push(Op::AddDest(*k, *d, dest.weight));
                }
            }
            Some(h) => {
                if h.service != w.service {
                    changes.push(Op::SetService(*k, w.service.clone()));
                }
                for (d, dest) in &w.dests {
                    match h.dests.get(d) {
                        None => add_dests.push(Op::AddDest(*k, *d, dest.weight)),
                        Some(old) if old.weight != dest.weight => {
                            changes.push(Op::SetDest(*k, *d, dest.weight))
                        }
                        Some(_) => {}
                    }
                }
                for (d, old) in &h.dests {
                    if w.dests.contains_key(d) {
                        continue;
                    }
                    let busy = old.active + old.inactive > 0;
                    if k.protocol == Protocol::Tcp && busy {
                        if old.weight != 0 {
                            changes.push(Op::SetDest(*k, *d, 0));
                        }
                    } else {
                        del_dests.push(Op::DelDest(*k, *d));
                    }
                }
            }
        }
    }
    for k in have.keys() {
        if !want.contains_key(k) {
            del_services.push(Op::DelService(*k));
        }
    }
    let mut ops = add_services;
    ops.extend(add_dests);
    ops.extend(changes);
    ops.extend(del_dests);
    ops.extend(del_services);
    ops
}

/// Real servers kept at weight 0 because connections still use them: (virtual, real).
pub fn draining(want: &Table, have: &Table) -> Vec<(super::VirtualKey, super::DestKey)> {
    let mut out = Vec::new();
    for (k, h) in have {
        let Some(w) = want.get(k) else { continue };
        for (d, old) in &h.dests {
            let busy = old.active + old.inactive > 0;
            if k.protocol == Protocol::Tcp && busy && !w.dests.contains_key(d) {
                out.push((*k, *d));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::super::fake::Fake;
    use super::super::{Backend, Dest, DestKey, Service, Virtual, VirtualKey};
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    fn vk(i: u8, protocol: Protocol) -> VirtualKey {
        VirtualKey {
            addr: format!("10.96.0.{i}").parse().unwrap(),
            protocol,
            port: 80,
        }
    }

    fn dk(i: u8) -> DestKey {
        DestKey {
            addr: format!("10.244.0.{i}").parse().unwrap(),
            port: 8080,
        }
    }

    fn virt(sched: &str, dests: &[u8]) -> Virtual {
        Virtual {
            service: Service {
                scheduler: sched.into(),
                flags: 0,
                timeout: 0,
            },
            dests: dests.iter().map(|i| (dk(*i), Dest::weighted(1))).collect(),
        }
    }

    #[test]
    fn services_come_before_their_dests_and_go_after_them() {
        let a = vk(1, Protocol::Tcp);
        let b = vk(2, Protocol::Udp);
        let have = Table::from([(b, virt("rr", &[1, 2]))]);
        let want = Table::from([(a, virt("rr", &[3]))]);
        assert_eq!(
            plan(&want, &have),
            vec![
                Op::AddService(a, want[&a].service.clone()),
                Op::AddDest(a, dk(3), 1),
                Op::DelService(b),
            ]
        );
        let mut fake = Fake {
            table: have,
            ..Fake::default()
        };
        let out = fake.apply(&plan(&want, &fake.table.clone())).unwrap();
        assert!(out.refused.is_empty());
        assert_eq!(fake.table, want);
    }

    #[test]
    fn a_busy_tcp_real_server_drains_at_weight_zero_and_udp_goes_at_once() {
        let t = vk(1, Protocol::Tcp);
        let u = vk(2, Protocol::Udp);
        let mut have = Table::from([(t, virt("rr", &[1, 2])), (u, virt("rr", &[1, 2]))]);
        for v in have.values_mut() {
            v.dests.get_mut(&dk(2)).unwrap().active = 3;
        }
        let want = Table::from([(t, virt("rr", &[1])), (u, virt("rr", &[1]))]);
        let ops = plan(&want, &have);
        assert_eq!(ops, vec![Op::SetDest(t, dk(2), 0), Op::DelDest(u, dk(2))]);
        assert_eq!(draining(&want, &have), vec![(t, dk(2))]);
        // Drained (weight 0 and no connections left): deleted.
        let d = have.get_mut(&t).unwrap().dests.get_mut(&dk(2)).unwrap();
        d.weight = 0;
        d.active = 0;
        assert_eq!(plan(&want, &have)[0], Op::DelDest(t, dk(2)));
        // Still busy at weight 0: nothing to send.
        have.get_mut(&t)
            .unwrap()
            .dests
            .get_mut(&dk(2))
            .unwrap()
            .inactive = 1;
        have.get_mut(&u).unwrap().dests.remove(&dk(2));
        assert!(plan(&want, &have).is_empty());
        // Back before it drained: weight 1 again.
        let back = Table::from([(t, virt("rr", &[1, 2])), (u, virt("rr", &[1]))]);
        assert_eq!(plan(&back, &have), vec![Op::SetDest(t, dk(2), 1)]);
    }

    #[test]
    fn a_changed_scheduler_is_an_update_not_a_replacement() {
        let a = vk(1, Protocol::Tcp);
        let have = Table::from([(a, virt("rr", &[1]))]);
        let want = Table::from([(a, virt("wrr", &[1]))]);
        assert_eq!(
            plan(&want, &have),
            vec![Op::SetService(a, want[&a].service.clone())]
        );
    }

    fn table() -> impl Strategy<Value = Table> {
        let virtual_ = (
            prop::sample::select(vec!["rr", "wrr", "mh"]),
            prop::collection::btree_map(0u8..6, 0u32..3, 0..5),
        );
        prop::collection::btree_map((0u8..6, any::<bool>()), virtual_, 0..6).prop_map(|m| {
            m.into_iter()
                .map(|((i, udp), (sched, dests))| {
                    let p = if udp { Protocol::Udp } else { Protocol::Tcp };
                    let v = Virtual {
                        service: Service {
                            scheduler: sched.into(),
                            flags: 0,
                            timeout: 0,
                        },
                        dests: dests
                            .into_iter()
                            .map(|(d, w)| (dk(d), Dest::weighted(w)))
                            .collect::<BTreeMap<_, _>>(),
                    };
                    (vk(i, p), v)
                })
                .collect()
        })
    }

    proptest! {
        /// Without connections in the way, applying the plan to the kernel (the Fake, with
        /// its EEXIST/ESRCH/ENOENT answers) gives exactly the wanted table, refusing nothing.
        #[test]
        fn any_table_reaches_any_other(have in table(), want in table()) {
            let mut fake = Fake { table: have.clone(), ..Fake::default() };
            let out = fake.apply(&plan(&want, &have)).unwrap();
            prop_assert!(out.refused.is_empty(), "{:?}", out.refused);
            prop_assert_eq!(&fake.table, &want);
            prop_assert!(plan(&want, &fake.table).is_empty());
        }
    }
}
