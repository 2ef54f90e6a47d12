//! Merged Service and endpoint state of one engine, updated by one [`ChangeSet`] per sync.
//!
//! A cluster IP always wins over another Service's externalIP or load-balancer IP (the
//! CVE-2020-8554 class: a Service claiming kube-dns's address): the contested address is left
//! out of the claimant's view, so no mode programs it, and [`State::address_conflicts`] names
//! each one. A Service whose view changes because another's cluster IP came or went is
//! reported as changed by [`State::apply`], so partial syncs rewrite it.

use crate::model::{
    aggregate, ChangeSet, Cidr, Endpoint, EndpointPort, EndpointsChange, IpFamily, NodeInfo,
    PortSpec, Service, ServiceChange, ServiceKey, ServicePortName,
};
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

/// What one [`State::apply`] changed.
#[derive(Debug, Default)]
pub struct Applied {
    /// Services whose spec or endpoints changed (or that were deleted).
    pub services: BTreeSet<ServiceKey>,
    /// The Node's topology changed: every service's endpoint choice may differ.
    pub topology: bool,
    /// This family's service CIDRs changed.
    pub service_cidrs: bool,
}

/// One port of one Service, seen from one IP family.
#[derive(Debug)]
pub struct ServicePortView<'a> {
    pub name: ServicePortName,
    pub service: &'a Service,
    pub port: &'a PortSpec,
    pub cluster_ip: Option<IpAddr>,
    pub external_ips: Vec<IpAddr>,
    pub load_balancer_ips: Vec<IpAddr>,
    pub source_ranges: Vec<Cidr>,
}

impl ServicePortView<'_> {
    /// The traffic policies that decide which endpoints serve this port.
    pub fn policies(&self) -> crate::topology::Policies {
        crate::topology::Policies {
            internal_local: self.service.internal_policy_local(),
            external_local: self.service.external_policy_local(),
            externally_accessible: self.externally_accessible(),
        }
    }

    /// Reachable from outside the cluster at all on this family.
    pub fn externally_accessible(&self) -> bool {
        self.port.node_port != 0
            || !self.external_ips.is_empty()
            || !self.load_balancer_ips.is_empty()
    }
}

/// One Service's whole input (`None` and no endpoints: absent).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Entry {
    pub service: Option<Service>,
    pub endpoints: Vec<EndpointPort>,
}

impl Entry {
    /// A change set that sets each key to its entry.
    pub fn changes<'a>(
        entries: impl IntoIterator<Item = (&'a ServiceKey, &'a Entry)>,
    ) -> ChangeSet {
        let mut cs = ChangeSet::default();
        for (key, e) in entries {
            cs.services.push(ServiceChange {
                key: key.clone(),
                service: e.service.clone(),
            });
            cs.endpoints.push(EndpointsChange {
                key: key.clone(),
                ports: e.endpoints.clone(),
            });
        }
        cs
    }
}

#[derive(Clone, Debug, Default)]
pub struct State {
    family: Option<IpFamily>,
    services: BTreeMap<ServiceKey, Service>,
    endpoints: BTreeMap<ServiceKey, Vec<EndpointPort>>,
    node: NodeInfo,
    /// This family's ServiceCIDRs, as the fewest non-overlapping prefixes.
    service_cidrs: Vec<Cidr>,
    /// How many Services hold each cluster IP, and claim each external or LB IP (any
    /// family). Counts, not keys: a few dozen bytes per Service; who they are is looked up in
    /// `services` in the rare case of a conflict.
    cluster_ips: BTreeMap<IpAddr, u32>,
    external_claims: BTreeMap<IpAddr, u32>,
}

/// An externalIP or LB IP left out because it is another Service's cluster IP.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AddressConflict {
    pub service: ServiceKey,
    pub ip: IpAddr,
    /// The Service whose cluster IP it is.
    pub owner: ServiceKey,
}

fn claims(svc: &Service) -> impl Iterator<Item = &IpAddr> {
    svc.external_ips.iter().chain(svc.load_balancer_ips.iter())
}

/// Count `ips` in (`add`) or out of `map`; an address listed twice by one Service counts
/// once.
fn count<'a>(map: &mut BTreeMap<IpAddr, u32>, ips: impl Iterator<Item = &'a IpAddr>, add: bool) {
    let distinct: BTreeSet<&IpAddr> = ips.collect();
    for ip in distinct {
        if add {
            *map.entry(*ip).or_default() += 1;
        } else if let Some(n) = map.get_mut(ip) {
            *n -= 1;
            if *n == 0 {
                map.remove(ip);
            }
        }
    }
}

impl State {
    pub fn new(family: IpFamily) -> State {
        State {
            family: Some(family),
            ..State::default()
        }
    }

    fn family(&self) -> IpFamily {
        self.family.unwrap_or(IpFamily::V4)
    }

    pub fn node(&self) -> &NodeInfo {
        &self.node
    }

    pub fn service_cidrs(&self) -> &[Cidr] {
        &self.service_cidrs
    }

    pub fn has_service(&self, key: &ServiceKey) -> bool {
        self.services.contains_key(key)
    }

    pub fn service_count(&self) -> usize {
        self.services.len()
    }

    /// Everything one Service contributes: its spec and its merged endpoints.
    pub fn entry(&self, key: &ServiceKey) -> Entry {
        Entry {
            service: self.services.get(key).cloned(),
            endpoints: self.endpoints.get(key).cloned().unwrap_or_default(),
        }
    }

    /// Every key with a spec or endpoints, in order.
    pub fn entry_keys(&self) -> BTreeSet<ServiceKey> {
        let mut keys: BTreeSet<ServiceKey> = self.services.keys().cloned().collect();
        keys.extend(self.endpoints.keys().cloned());
        keys
    }

    /// The Services whose rules `changes` may change: those it names, and those claiming
    /// an address that becomes, or stops being, another Service's cluster IP. (Asked before
    /// [`State::apply`], to render what they were.)
    pub fn affected(&self, changes: &ChangeSet) -> BTreeSet<ServiceKey> {
        let mut out = self.dependents(&changes.services);
        out.extend(changes.services.iter().map(|c| c.key.clone()));
        out.extend(changes.endpoints.iter().map(|c| c.key.clone()));
        out
    }

    /// The claimants of every cluster IP that `services` add or remove.
    fn dependents(&self, services: &[ServiceChange]) -> BTreeSet<ServiceKey> {
        let mut out = BTreeSet::new();
        for c in services {
            let old = self.services.get(&c.key).map(|s| s.cluster_ips.as_slice());
            let new = c.service.as_ref().map(|s| s.cluster_ips.as_slice());
            let (old, new) = (old.unwrap_or_default(), new.unwrap_or_default());
            let gone = old.iter().filter(|ip| !new.contains(ip));
            let came = new.iter().filter(|ip| !old.contains(ip));
            for ip in gone.chain(came) {
                if self.external_claims.contains_key(ip) {
                    let claimants = self
                        .services
                        .iter()
                        .filter(|(_, s)| claims(s).any(|e| e == ip));
                    out.extend(claimants.map(|(k, _)| k.clone()));
                }
            }
        }
        out
    }

    /// Merge a change set; report which services it touched. Updates equal to what is already
    /// held are not reported (they need no rules rewritten).
    pub fn apply(&mut self, changes: ChangeSet) -> Applied {
        let mut applied = Applied::default();
        // Claimants of a cluster IP that comes or goes see their view change.
        let mut dependents = self.dependents(&changes.services);
        for change in changes.services {
            let differs = match &change.service {
                Some(svc) => self.services.get(&change.key) != Some(svc),
                None => self.services.contains_key(&change.key),
            };
            if !differs {
                continue;
            }
            if let Some(old) = self.services.get(&change.key) {
                count(&mut self.cluster_ips, old.cluster_ips.iter(), false);
                count(&mut self.external_claims, claims(old), false);
            }
            if let Some(new) = &change.service {
                count(&mut self.cluster_ips, new.cluster_ips.iter(), true);
                count(&mut self.external_claims, claims(new), true);
            }
            match change.service {
                Some(svc) => self.services.insert(change.key.clone(), svc),
                None => self.services.remove(&change.key),
            };
            applied.services.insert(change.key);
        }
        dependents.retain(|k| self.services.contains_key(k));
        applied.services.extend(dependents);
        for change in changes.endpoints {
            let differs = if change.ports.is_empty() {
                self.endpoints.contains_key(&change.key)
            } else {
                self.endpoints.get(&change.key) != Some(&change.ports)
            };
            if !differs {
                continue;
            }
            if change.ports.is_empty() {
                self.endpoints.remove(&change.key);
            } else {
                self.endpoints.insert(change.key.clone(), change.ports);
            }
            applied.services.insert(change.key);
        }
        if let Some(node) = changes.node {
            if node != self.node {
                self.node = node;
                applied.topology = true;
            }
        }
        if let Some(cidrs) = changes.service_cidrs {
            let family = self.family();
            let mine = aggregate(cidrs.into_iter().filter(|c| family.contains(&c.addr())));
            if mine != self.service_cidrs {
                self.service_cidrs = mine;
                applied.service_cidrs = true;
            }
        }
        applied
    }

    /// Every Service key, in order.
    pub fn service_keys(&self) -> impl Iterator<Item = &ServiceKey> {
        self.services.keys()
    }

    /// Every port of every Service that has a cluster IP of this engine's family, in
    /// deterministic (namespace, name, port) order.
    pub fn service_ports(&self) -> Vec<ServicePortView<'_>> {
        self.services
            .keys()
            .flat_map(|k| self.service_ports_of(k))
            .collect()
    }

    /// The ports of one Service on this engine's family (none if it has no cluster IP of the
    /// family, or does not exist).
    pub fn service_ports_of(&self, key: &ServiceKey) -> Vec<ServicePortView<'_>> {
        let fam = self.family();
        let mut out = Vec::new();
        let Some((key, svc)) = self.services.get_key_value(key) else {
            return out;
        };
        // Upstream only proxies a family the Service has a ClusterIP in.
        let Some(cluster_ip) = svc.cluster_ips.iter().copied().find(|ip| fam.contains(ip)) else {
            return out;
        };
        let of_family = |ips: &[IpAddr]| -> Vec<IpAddr> {
            let mut v: Vec<IpAddr> = ips
                .iter()
                .copied()
                .filter(|ip| fam.contains(ip) && !self.taken(ip, svc))
                .collect();
            v.sort();
            v.dedup();
            v
        };
        let mut source_ranges: Vec<Cidr> = svc
            .load_balancer_source_ranges
            .iter()
            .copied()
            .filter(|c| fam.contains(&c.addr()))
            .collect();
        source_ranges.sort();
        source_ranges.dedup();
        let mut ports: Vec<&PortSpec> = svc.ports.iter().collect();
        ports.sort_by(|a, b| (&a.name, a.protocol).cmp(&(&b.name, b.protocol)));
        for port in ports {
            out.push(ServicePortView {
                name: ServicePortName {
                    service: key.clone(),
                    port: port.name.clone(),
                    protocol: port.protocol,
                },
                service: svc,
                port,
                cluster_ip: Some(cluster_ip),
                external_ips: of_family(&svc.external_ips),
                load_balancer_ips: of_family(&svc.load_balancer_ips),
                source_ranges: source_ranges.clone(),
            });
        }
        out
    }

    /// Whether `ip`, claimed by `svc` as an external or LB IP, is another Service's cluster
    /// IP.
    fn taken(&self, ip: &IpAddr, svc: &Service) -> bool {
        let holders = self.cluster_ips.get(ip).copied().unwrap_or(0);
        holders > u32::from(svc.cluster_ips.contains(ip))
    }

    /// Every externalIP or LB IP of this family left out because it is another Service's
    /// cluster IP, in (Service, address) order.
    pub fn address_conflicts(&self) -> Vec<AddressConflict> {
        let fam = self.family();
        let contested = |ip: &IpAddr| fam.contains(ip) && self.cluster_ips.contains_key(ip);
        if !self.external_claims.keys().any(contested) {
            return Vec::new(); // the common case: no walk over the Services
        }
        // Who holds each contested address (one walk, not one per conflict).
        let mut holders: BTreeMap<IpAddr, Vec<&ServiceKey>> = BTreeMap::new();
        for (key, svc) in &self.services {
            for ip in svc
                .cluster_ips
                .iter()
                .filter(|ip| self.external_claims.contains_key(ip))
            {
                holders.entry(*ip).or_default().push(key);
            }
        }
        let mut out = Vec::new();
        for (key, svc) in &self.services {
            let mut mine: Vec<IpAddr> = claims(svc)
                .copied()
                .filter(|ip| contested(ip) && self.taken(ip, svc))
                .collect();
            mine.sort();
            mine.dedup();
            for ip in mine {
                let owner = holders.get(&ip).into_iter().flatten().find(|k| **k != key);
                if let Some(owner) = owner {
                    out.push(AddressConflict {
                        service: key.clone(),
                        ip,
                        owner: (*owner).clone(),
                    });
                }
            }
        }
        out
    }

    /// The endpoints of one service port on this family, sorted by address and port, with
    /// duplicates (the same address in two slices) removed.
    pub fn endpoints(&self, spn: &ServicePortName) -> Vec<&Endpoint> {
        let fam = self.family();
        let mut out: Vec<&Endpoint> = self
            .endpoints
            .get(&spn.service)
            .into_iter()
            .flatten()
            .filter(|p| p.name == spn.port && p.protocol == spn.protocol)
            .flat_map(|p| p.endpoints.iter())
            .filter(|e| fam.contains(&e.ip))
            .collect();
        out.sort_by_key(|e| (e.ip, e.port));
        out.dedup_by(|a, b| a.ip == b.ip && a.port == b.port);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn services(list: &[(&str, &str, &[&str])]) -> ChangeSet {
        let items: Vec<String> = list
            .iter()
            .map(|(name, cluster, external)| {
                let ext: Vec<String> = external.iter().map(|e| format!("{e:?}")).collect();
                format!(
                    r#"{{"namespace":"ns","name":"{name}","service":{{"cluster_ips":["{cluster}"],
                        "external_ips":[{}],"ports":[{{"name":"p","protocol":"TCP","port":53}}]}}}}"#,
                    ext.join(",")
                )
            })
            .collect();
        let json = format!(r#"{{"services":[{}]}}"#, items.join(","));
        ChangeSet::from_json(json.as_bytes()).unwrap()
    }

    fn deleted(name: &str) -> ChangeSet {
        let json =
            format!(r#"{{"services":[{{"namespace":"ns","name":"{name}","service":null}}]}}"#);
        ChangeSet::from_json(json.as_bytes()).unwrap()
    }

    fn key(name: &str) -> ServiceKey {
        ServiceKey {
            namespace: crate::model::Name::new("ns").unwrap(),
            name: crate::model::Name::new(name).unwrap(),
        }
    }

    fn externals(state: &State, name: &str) -> Vec<String> {
        state.service_ports_of(&key(name))[0]
            .external_ips
            .iter()
            .map(ToString::to_string)
            .collect()
    }

    #[test]
    fn a_cluster_ip_wins_over_another_services_external_ip_whichever_came_first() {
        let mut st = State::new(IpFamily::V4);
        // The claimant first: it holds the address until the owner of the cluster IP appears.
        st.apply(services(&[(
            "evil",
            "10.96.0.99",
            &["10.96.0.10", "192.0.2.1"],
        )]));
        assert_eq!(externals(&st, "evil"), ["10.96.0.10", "192.0.2.1"]);
        assert!(st.address_conflicts().is_empty());
        let change = services(&[("dns", "10.96.0.10", &[])]);
        assert_eq!(
            st.affected(&change),
            BTreeSet::from([key("dns"), key("evil")])
        );
        let applied = st.apply(change);
        assert_eq!(applied.services, BTreeSet::from([key("dns"), key("evil")]));
        assert_eq!(externals(&st, "evil"), ["192.0.2.1"]);
        let c = st.address_conflicts();
        assert_eq!(c.len(), 1);
        assert_eq!(
            (c[0].service.clone(), c[0].owner.clone()),
            (key("evil"), key("dns"))
        );
        // The owner gone, the claimant gets the address back (and is rewritten).
        let applied = st.apply(deleted("dns"));
        assert!(applied.services.contains(&key("evil")));
        assert_eq!(externals(&st, "evil"), ["10.96.0.10", "192.0.2.1"]);
        assert!(st.address_conflicts().is_empty());
        // A Service's own cluster IP among its external IPs is no conflict.
        st.apply(services(&[("self", "10.96.0.7", &["10.96.0.7"])]));
        assert_eq!(externals(&st, "self"), ["10.96.0.7"]);
    }
}
