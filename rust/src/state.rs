//! Merged Service and endpoint state of one engine, updated by one [`ChangeSet`] per sync.

use crate::model::{
    ChangeSet, Cidr, Endpoint, EndpointPort, IpFamily, NodeInfo, PortSpec, Service, ServiceKey,
    ServicePortName,
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

#[derive(Debug, Default)]
pub struct State {
    family: Option<IpFamily>,
    services: BTreeMap<ServiceKey, Service>,
    endpoints: BTreeMap<ServiceKey, Vec<EndpointPort>>,
    node: NodeInfo,
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

    pub fn has_service(&self, key: &ServiceKey) -> bool {
        self.services.contains_key(key)
    }

    pub fn service_count(&self) -> usize {
        self.services.len()
    }

    /// Merge a change set; report which services it touched. Updates equal to what is already
    /// held are not reported (they need no rules rewritten).
    pub fn apply(&mut self, changes: ChangeSet) -> Applied {
        let mut applied = Applied::default();
        for change in changes.services {
            let differs = match &change.service {
                Some(svc) => self.services.get(&change.key) != Some(svc),
                None => self.services.contains_key(&change.key),
            };
            if !differs {
                continue;
            }
            match change.service {
                Some(svc) => self.services.insert(change.key.clone(), svc),
                None => self.services.remove(&change.key),
            };
            applied.services.insert(change.key);
        }
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
            let mut v: Vec<IpAddr> = ips.iter().copied().filter(|ip| fam.contains(ip)).collect();
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
