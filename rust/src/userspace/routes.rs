//! Which listeners the userspace mode opens, and where each one's connections go.
//!
//! The listener path (no privileges needed): every Service port with a NodePort is served
//! on `<listen address>:<nodePort>`, as NodePort traffic: the external traffic policy picks
//! the endpoints (Local: this node's only), with the same categorization as the kernel
//! modes (ready endpoints, topology hints, terminating fallback). A port without usable
//! endpoints keeps its listener, which resets connections, as the kernel modes reject them.
//!
//! The redirect path (`portals`, needs NET_ADMIN): every Service port also gets a portal
//! listener for its ClusterIP (internal traffic policy) and, when it has external IPs or
//! load-balancer IPs, one for those (external policy); redirect rules send the Service
//! addresses there ([`super::portals`]).

use crate::forward::{Listen, Route};
use crate::model::{Protocol, ServiceKey};
use crate::state::{ServicePortView, State};
use crate::topology::{NodeView, Serving};
use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

/// Every Service's listeners.
pub fn routes(
    state: &State,
    node_name: &str,
    listen: &[IpAddr],
    portals: bool,
) -> BTreeMap<Listen, Route> {
    routes_of(state, state.service_ports(), node_name, listen, portals)
}

/// The listeners of the Services in `keys` only (none for a deleted one).
pub fn routes_for(
    state: &State,
    keys: &BTreeSet<ServiceKey>,
    node_name: &str,
    listen: &[IpAddr],
    portals: bool,
) -> BTreeMap<Listen, Route> {
    let ports = keys.iter().flat_map(|k| state.service_ports_of(k));
    routes_of(state, ports, node_name, listen, portals)
}

fn routes_of<'a>(
    state: &State,
    ports: impl IntoIterator<Item = ServicePortView<'a>>,
    node_name: &str,
    listen: &[IpAddr],
    portals: bool,
) -> BTreeMap<Listen, Route> {
    let node = NodeView {
        name: node_name,
        zone: state.node().zone.as_deref(),
    };
    let mut out = BTreeMap::new();
    for sp in ports {
        if sp.name.protocol == Protocol::Sctp {
            continue;
        }
        let svc = sp.service;
        let serving = Serving::of(state, &sp, node);
        let to_addrs = |eps: &[&crate::model::Endpoint]| -> Vec<SocketAddr> {
            eps.iter()
                .map(|e| SocketAddr::new(e.ip, e.port.get()))
                .collect()
        };
        let internal = to_addrs(serving.internal());
        let external = to_addrs(serving.external());
        let route = |endpoints: &Vec<SocketAddr>, portal_ips: Vec<IpAddr>| Route {
            owner: sp.name.service.clone(),
            service: sp.name.to_string(),
            endpoints: endpoints.clone(),
            affinity: svc
                .session_affinity_timeout
                .map(|s| Duration::from_secs(u64::from(s))),
            portal_ips,
        };
        let port = sp.port.port.get();
        let protocol = sp.name.protocol;
        if portals {
            if let Some(ip) = sp.cluster_ip {
                let l = Listen {
                    addr: SocketAddr::new(ip, port),
                    protocol,
                    portal: true,
                };
                out.insert(l, route(&internal, vec![ip]));
            }
            let mut outside: Vec<IpAddr> = sp.external_ips.clone();
            outside.extend(sp.load_balancer_ips.iter().copied());
            outside.sort();
            outside.dedup();
            if let Some(first) = outside.first() {
                let l = Listen {
                    addr: SocketAddr::new(*first, port),
                    protocol,
                    portal: true,
                };
                out.insert(l, route(&external, outside));
            }
        }
        let node_port = sp.port.node_port;
        if node_port == 0 {
            continue;
        }
        for ip in listen {
            let l = Listen {
                addr: SocketAddr::new(*ip, node_port),
                protocol,
                portal: false,
            };
            out.insert(l, route(&external, Vec::new()));
        }
    }
    out
}
