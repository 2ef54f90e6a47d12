//! The engine's nftables side: turn a sync into one transaction (plus a cleanup transaction
//! for what nothing references any more) and keep the writer in step with the kernel.

use super::ast::{Fmt, Op};
use super::backend::{Backend, Fake, Model};
use super::render::{self, ServiceObjects};
use super::writer::{Plan, Writer};
use crate::error::Result;
use crate::iptables::render::RenderConfig;
use crate::model::{IpFamily, ServiceKey};
use crate::state::State;
use std::collections::{BTreeMap, BTreeSet};

/// What one nftables sync wrote.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Written {
    pub transactions: usize,
    pub bytes: usize,
    pub chains_written: usize,
    pub rules_written: usize,
    pub elements_added: usize,
    pub elements_deleted: usize,
    pub stale_chains_deleted: usize,
    /// The cleanup transaction was refused (retried by the next sync).
    pub cleanup_failed: bool,
    pub render_seconds: f64,
    pub apply_seconds: f64,
}

pub struct Program {
    family: IpFamily,
    backend: Box<dyn Backend>,
    writer: Writer,
    /// What the Services a change set touches rendered to before it was applied.
    before: BTreeMap<ServiceKey, ServiceObjects>,
}

impl Program {
    pub fn new(family: IpFamily, backend: Box<dyn Backend>) -> Program {
        Program {
            family,
            backend,
            writer: Writer::default(),
            before: BTreeMap::new(),
        }
    }

    pub fn writer(&self) -> &Writer {
        &self.writer
    }

    /// Call before applying a change set to `state`: remember what the Services in `keys`
    /// render to now (the kernel's content for them), for the partial sync that follows.
    pub fn remember(&mut self, state: &State, cfg: &RenderConfig, keys: &BTreeSet<ServiceKey>) {
        self.before = keys
            .iter()
            .filter(|k| state.has_service(k))
            .map(|k| (k.clone(), render::render_service(state, cfg, k)))
            .collect();
    }

    /// Write `changed` (or everything, when `full`). On failure nothing was changed in the
    /// kernel (a transaction is atomic) and the caller must make the next sync full.
    pub fn sync(
        &mut self,
        state: &State,
        cfg: &RenderConfig,
        changed: &BTreeSet<ServiceKey>,
        full: bool,
    ) -> Result<Written> {
        let t0 = std::time::Instant::now();
        let plan: Plan = if full {
            // Sessions survive a resync: carry the affinity entries into the new table.
            let affinity = self.backend.affinity()?;
            self.writer.full(state, cfg, &affinity)
        } else {
            self.writer.partial(state, cfg, changed, &mut self.before)
        };
        self.before.clear();
        let mut w = Written {
            chains_written: plan.chains_written,
            rules_written: plan.rules_written,
            elements_added: plan.elements_added,
            elements_deleted: plan.elements_deleted,
            render_seconds: t0.elapsed().as_secs_f64(),
            ..Written::default()
        };
        let t1 = std::time::Instant::now();
        if !plan.ops.is_empty() {
            w.bytes += self.apply(&plan.ops)?;
            w.transactions += 1;
        }
        if !plan.cleanup.is_empty() {
            // Failing here loses nothing: the stale objects are retried next time.
            match self.apply(&plan.cleanup) {
                Ok(bytes) => {
                    w.bytes += bytes;
                    w.transactions += 1;
                    w.stale_chains_deleted = plan
                        .cleanup
                        .iter()
                        .filter(|o| matches!(o, Op::DeleteChain(_)))
                        .count();
                    self.writer.cleaned();
                }
                Err(_) => w.cleanup_failed = true,
            }
        }
        w.apply_seconds = t1.elapsed().as_secs_f64();
        Ok(w)
    }

    fn apply(&mut self, ops: &[Op]) -> Result<usize> {
        self.backend.apply(ops)
    }

    /// The complete transaction for `state` (nothing is applied).
    pub fn render(&self, state: &State, cfg: &RenderConfig) -> String {
        Fmt(self.family).script(&Writer::default().full(state, cfg, &[]).ops)
    }

    /// The table `state` programs, in memory (for the tracer).
    pub fn model(&self, state: &State, cfg: &RenderConfig) -> Result<Model> {
        if let Some(m) = self.backend.model() {
            return Ok(m.clone());
        }
        let mut fake = Fake::new(self.family);
        fake.apply(&Writer::default().full(state, cfg, &[]).ops)?;
        Ok(fake.model)
    }

    pub fn intact(&mut self) -> Result<bool> {
        self.backend.intact()
    }

    pub fn dump(&mut self) -> Result<String> {
        self.backend.dump()
    }
}

/// Remove kproxy's nftables table in one family (safe when there is none).
pub fn cleanup(backend: &mut dyn Backend) -> Result<()> {
    backend.apply(&[Op::AddTable, Op::DeleteTable]).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{Engine, EngineConfig};
    use crate::model::ChangeSet;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Arc;

    /// A Fake whose next transactions can be made to fail from outside the engine.
    struct Flaky {
        inner: Fake,
        fail: Arc<AtomicUsize>,
        /// Refuse every transaction that deletes a set (a cleanup).
        refuse_set_deletes: Arc<AtomicBool>,
    }

    impl Backend for Flaky {
        fn apply(&mut self, ops: &[Op]) -> Result<usize> {
            let deletes_a_set = ops.iter().any(|o| matches!(o, Op::DeleteSet(_)));
            if deletes_a_set && self.refuse_set_deletes.load(Ordering::SeqCst) {
                self.fail.store(1, Ordering::SeqCst);
            }
            if self.fail.load(Ordering::SeqCst) > 0 {
                self.fail.fetch_sub(1, Ordering::SeqCst);
                return Err(crate::error::Error::Apply {
                    op: "nft -f",
                    code: Some(1),
                    stderr: "refused".into(),
                });
            }
            self.inner.apply(ops)
        }
        fn affinity(&mut self) -> Result<Vec<(super::super::ast::Key, u32)>> {
            self.inner.affinity()
        }
        fn intact(&mut self) -> Result<bool> {
            self.inner.intact()
        }
        fn dump(&mut self) -> Result<String> {
            self.inner.dump()
        }
        fn model(&self) -> Option<&Model> {
            self.inner.model()
        }
    }

    fn changes(eps_of_s1: &[&str]) -> ChangeSet {
        let eps: Vec<String> = eps_of_s1
            .iter()
            .map(|ip| {
                format!(
                    r#"{{"ip":"{ip}","port":8080,"ready":true,"serving":true,"terminating":false}}"#
                )
            })
            .collect();
        let json = format!(
            r#"{{"services":[{{"namespace":"ns","name":"s1","service":{{"cluster_ips":["172.30.0.1"],"ports":[{{"name":"p","protocol":"TCP","port":80}}]}}}}],
               "endpoints":[{{"namespace":"ns","name":"s1","ports":[{{"name":"p","protocol":"TCP","endpoints":[{}]}}]}}]}}"#,
            eps.join(",")
        );
        ChangeSet::from_json(json.as_bytes()).unwrap()
    }

    #[test]
    fn a_refused_transaction_keeps_the_table_and_makes_the_next_sync_full() {
        let cfg = EngineConfig::from_json(
            r#"{"family":"IPv4","node_name":"n","mode":"nftables","backend":"fake"}"#,
        )
        .unwrap();
        let fail = Arc::new(AtomicUsize::new(0));
        let backend = Flaky {
            inner: Fake::new(IpFamily::V4),
            fail: fail.clone(),
            refuse_set_deletes: Arc::default(),
        };
        let mut engine = Engine::with_nft_backend(cfg, Box::new(backend));
        engine
            .sync(changes(&["10.1.0.1", "10.1.0.2"]), false)
            .unwrap();
        let before = engine.dump().unwrap();
        fail.store(1, Ordering::SeqCst);
        assert!(engine.sync(changes(&["10.1.0.3"]), false).is_err());
        assert!(engine.needs_full_sync());
        assert_eq!(engine.dump().unwrap(), before);
        let r = engine.sync(ChangeSet::default(), false).unwrap();
        assert!(r.full);
        assert!(engine.dump().unwrap().contains("10.1.0.3 . 8080"));
        assert!(!engine.dump().unwrap().contains("10.1.0.2"));
    }

    /// A pool left empty goes with its set rather than element by element; when the set's
    /// deletion is refused and the pool is needed again, it is started anew.
    #[test]
    fn a_pool_whose_cleanup_failed_is_recreated_when_reused() {
        let cfg = EngineConfig::from_json(
            r#"{"family":"IPv4","node_name":"n","mode":"nftables","backend":"fake"}"#,
        )
        .unwrap();
        let refuse = Arc::new(AtomicBool::new(false));
        let backend = Flaky {
            inner: Fake::new(IpFamily::V4),
            fail: Arc::default(),
            refuse_set_deletes: refuse.clone(),
        };
        let mut engine = Engine::with_nft_backend(cfg, Box::new(backend));
        engine
            .sync(changes(&["10.1.0.1", "10.1.0.2"]), false)
            .unwrap();
        refuse.store(true, Ordering::SeqCst);
        // endpoints-2 is retired: its elements are not deleted one by one, and its cleanup is
        // refused, so the set keeps them.
        let r = engine
            .sync(changes(&["10.1.0.1", "10.1.0.2", "10.1.0.3"]), false)
            .unwrap();
        assert!(r.cleanup_failed && !r.full);
        let dump = engine.dump().unwrap();
        assert!(
            dump.contains("endpoints-2") && dump.contains("10.1.0.2"),
            "{dump}"
        );
        refuse.store(false, Ordering::SeqCst);
        // Back to two endpoints: the stale set would refuse the new data for its keys.
        let r = engine
            .sync(changes(&["10.1.0.4", "10.1.0.5"]), false)
            .unwrap();
        assert!(!r.full && !r.cleanup_failed);
        let dump = engine.dump().unwrap();
        for gone in ["10.1.0.1", "10.1.0.2", "10.1.0.3", "endpoints-3"] {
            assert!(!dump.contains(gone), "{gone} in {dump}");
        }
        assert!(dump.contains("10.1.0.4 . 8080") && dump.contains("10.1.0.5 . 8080"));
    }

    #[test]
    fn pool_names_round_trip() {
        use super::super::render::{Entry, Pool};
        for entry in [Entry::Vip, Entry::NodePort] {
            for local in [false, true] {
                let p = Pool {
                    entry,
                    local,
                    size: 17,
                };
                assert_eq!(Pool::parse(&p.name()), Some(p));
            }
        }
        for bad in [
            "endpoints-0",
            "endpoints-x",
            "local-nodeport-endpoints-3",
            "service-1",
        ] {
            assert_eq!(Pool::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn ipv6_rules_use_ip6_and_brackets() {
        use super::super::ast::{Fmt, Rule, Stmt};
        use crate::model::Protocol;
        let mut s = String::new();
        Fmt(IpFamily::V6).rule(
            &Rule::always(Stmt::Dnat(Protocol::Udp, "fd00::1".parse().unwrap(), 53)),
            &mut s,
        );
        assert_eq!(s, "meta l4proto udp dnat to [fd00::1]:53");
    }
}
