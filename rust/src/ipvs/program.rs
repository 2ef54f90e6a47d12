//! The ipvs mode's half of an engine: what was applied last, and the sync that moves the
//! kernel's table to the wanted one.
//!
//! A partial sync plans against the table it applied last (no dump); a full sync, or the
//! first after a failure, reads the kernel's table first. When the kernel refuses some
//! operations, the rest stay applied (each message commits alone): the table is read back so
//! the next plan starts from the truth, the refusals are reported naming their Service ports,
//! and the next sync is full.

use super::plan::{draining, plan};
use super::{Backend, Table, VirtualKey};
use crate::error::{Error, Result};
use std::collections::BTreeMap;

/// What one sync sent.
#[derive(Debug, Default)]
pub struct Written {
    pub operations: usize,
    pub sends: usize,
}

pub struct Program {
    backend: Box<dyn Backend>,
    v6: bool,
    /// What the kernel holds, as far as we know; `None`: read it before planning.
    applied: Option<Table>,
}

impl Program {
    pub fn new(backend: Box<dyn Backend>, v6: bool) -> Program {
        Program {
            backend,
            v6,
            applied: None,
        }
    }

    /// `names`: the Service port each virtual server belongs to, for error messages.
    pub fn sync(
        &mut self,
        want: Table,
        names: &BTreeMap<VirtualKey, String>,
        full: bool,
    ) -> Result<Written> {
        let have = match self.applied.take() {
            Some(t) if !full => t,
            _ => self.backend.dump(self.v6)?,
        };
        let ops = plan(&want, &have);
        let out = self.backend.apply(&ops)?;
        let written = Written {
            operations: ops.len(),
            sends: out.messages_per_send.len(),
        };
        if out.refused.is_empty() && draining(&want, &have).is_empty() {
            self.applied = Some(want);
            return Ok(written);
        }
        // Refusals, or real servers left draining at weight 0: the kernel's table is not
        // the wanted one; read it back so the next plan starts from what is there.
        self.applied = Some(self.backend.dump(self.v6)?);
        if out.refused.is_empty() {
            return Ok(written);
        }
        self.applied = None;
        let lines: Vec<String> = out
            .refused
            .iter()
            .map(|(i, errno)| {
                let op = &ops[*i];
                let owner = names.get(&op.key()).map_or("?", String::as_str);
                let e = std::io::Error::from_raw_os_error(*errno);
                format!("{owner}: {op}: {e}")
            })
            .collect();
        Err(Error::Apply {
            op: "ipvs",
            code: out.refused.first().map(|(_, e)| *e),
            stderr: format!(
                "the kernel refused {} of {} operations (the others are applied):\n{}",
                lines.len(),
                ops.len(),
                lines.join("\n")
            ),
        })
    }

    /// The kernel's table as it is now.
    pub fn dump(&mut self) -> Result<Table> {
        self.backend.dump(self.v6)
    }
}

#[cfg(test)]
mod tests {
    use super::super::fake::Fake;
    use super::super::{Dest, DestKey, Service, Virtual};
    use super::*;
    use crate::model::Protocol;

    fn vk(i: u8) -> VirtualKey {
        VirtualKey {
            addr: format!("10.96.0.{i}").parse().unwrap(),
            protocol: Protocol::Tcp,
            port: 80,
        }
    }

    fn one(dests: &[u8]) -> Virtual {
        Virtual {
            service: Service {
                scheduler: "rr".into(),
                flags: 0,
                timeout: 0,
            },
            dests: dests
                .iter()
                .map(|d| {
                    let k = DestKey {
                        addr: format!("10.244.0.{d}").parse().unwrap(),
                        port: 8080,
                    };
                    (k, Dest::weighted(1))
                })
                .collect(),
        }
    }

    /// A shared Fake the test can inspect while the program owns a handle to it.
    struct Shared(std::sync::Arc<std::sync::Mutex<Fake>>);

    impl Backend for Shared {
        fn apply(&mut self, ops: &[super::super::Op]) -> Result<super::super::Outcome> {
            self.0.lock().unwrap().apply(ops)
        }
        fn dump(&mut self, v6: bool) -> Result<Table> {
            self.0.lock().unwrap().dump(v6)
        }
    }

    #[test]
    fn a_refusal_names_the_service_port_and_the_rest_is_applied_then_reconciled() {
        let fake = std::sync::Arc::new(std::sync::Mutex::new(Fake::default()));
        let mut p = Program::new(Box::new(Shared(fake.clone())), false);
        let names: BTreeMap<_, _> = [(vk(1), "ns/a:http".to_owned()), (vk(2), "ns/b:http".into())]
            .into_iter()
            .collect();
        let want = Table::from([(vk(1), one(&[1, 2])), (vk(2), one(&[3]))]);
        fake.lock().unwrap().refuse.insert(vk(2));
        let err = p.sync(want.clone(), &names, false).unwrap_err().to_string();
        assert!(
            err.contains("ns/b:http: add virtual server 10.96.0.2:80/tcp"),
            "{err}"
        );
        assert!(err.contains("refused 2 of 5"), "{err}");
        assert_eq!(fake.lock().unwrap().table[&vk(1)], want[&vk(1)]); // applied despite b
                                                                      // The kernel accepts again: the next sync (full, after the failure) completes it,
                                                                      // sending only what is missing.
        fake.lock().unwrap().refuse.clear();
        let before = fake.lock().unwrap().log.len();
        p.sync(want.clone(), &names, true).unwrap();
        assert_eq!(fake.lock().unwrap().table, want);
        assert_eq!(fake.lock().unwrap().log.len() - before, 2);
        // Nothing changed: nothing sent, and no dump needed for a partial sync.
        let w = p.sync(want.clone(), &names, false).unwrap();
        assert_eq!(w.operations, 0);
    }

    #[test]
    fn something_else_removing_our_servers_is_repaired_by_a_full_sync() {
        let fake = std::sync::Arc::new(std::sync::Mutex::new(Fake::default()));
        let mut p = Program::new(Box::new(Shared(fake.clone())), false);
        let want = Table::from([(vk(1), one(&[1, 2]))]);
        p.sync(want.clone(), &BTreeMap::new(), true).unwrap();
        fake.lock().unwrap().table.clear(); // ipvsadm -C
        p.sync(want.clone(), &BTreeMap::new(), true).unwrap();
        assert_eq!(fake.lock().unwrap().table, want);
    }
}
