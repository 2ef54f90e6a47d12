//! Property tests: the parsers that read outside input never panic, whatever they are fed,
//! and only valid names ever come out of a change set.

use _core::ipvs::message::{decode_dest, decode_service, encode};
use _core::ipvs::{DestKey, Op, Service, VirtualKey};
use _core::model::Protocol;
use _core::model::{ChangeSet, IpFamily};
use _core::nftables::json::model_from_json;
use _core::nftables::netlink::read_acks;
use _core::trace::xtables::Ruleset;
use proptest::prelude::*;
use std::net::IpAddr;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn iptables_save_parser_never_panics(text in "(\\PC|\\n){0,400}") {
        let _ = Ruleset::parse(&text);
    }

    #[test]
    fn iptables_parser_survives_rule_shaped_noise(
        chain in "[A-Z-]{1,12}",
        args in prop::collection::vec("(-[a-z!]{1,3}|--[a-z-]{1,12}|\"[^\"]{0,8}\"|[0-9./:!]{1,10}|[A-Za-z]{1,8})", 0..16),
    ) {
        let text = format!("*nat\n:{chain} - [0:0]\n-A {chain} {}\nCOMMIT\n", args.join(" "));
        let _ = Ruleset::parse(&text);
    }

    #[test]
    fn nft_json_reader_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
        let _ = model_from_json(&bytes, IpFamily::V4);
    }

    /// Structurally valid nft JSON with random expressions in kproxy's sets and rules.
    #[test]
    fn nft_json_reader_survives_shaped_noise(
        leaf in prop::sample::select(vec![
            "\"10.0.0.1\"", "\"fd00::1\"", "80", "-5", "4294967296", "\"tcp\"", "\"@service-ips\"",
            "null", "{\"prefix\":{\"addr\":\"10.0.0.0\",\"len\":99}}", "[]", "{}",
            "{\"concat\":[\"10.0.0.1\",\"tcp\"]}", "{\"numgen\":{\"mode\":\"inc\",\"mod\":1,\"offset\":-1}}",
            "{\"payload\":{\"protocol\":\"ip\",\"field\":\"daddr\"}}", "{\"goto\":{\"target\":7}}",
        ]),
        op in prop::sample::select(vec!["==", "!=", "in", "<"]),
        stmt in prop::sample::select(vec!["jump", "goto", "vmap", "dnat", "set", "mangle", "drop", "masquerade"]),
    ) {
        let json = format!(
            r#"{{"nftables":[{{"table":{{}}}},{{"chain":{{"name":"c","type":"nat","hook":"output","prio":{leaf}}}}},
              {{"map":{{"name":"service-ips","type":["ipv4_addr","inet_proto","inet_service"],"map":"verdict","elem":[[{leaf},{leaf}]]}}}},
              {{"set":{{"name":"endpoints-3","type":{leaf},"map":{leaf},"elem":[{leaf}]}}}},
              {{"rule":{{"chain":"c","expr":[{{"match":{{"op":"{op}","left":{leaf},"right":{leaf}}}}},{{"{stmt}":{leaf}}}]}}}}]}}"#
        );
        let _ = model_from_json(json.as_bytes(), IpFamily::V4);
    }

    #[test]
    fn change_set_decoder_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
        let _ = ChangeSet::from_json(&bytes);
    }

    #[test]
    fn decoded_names_are_always_dns_labels(name in "\\PC{0,70}") {
        let json = format!(
            r#"{{"services":[{{"namespace":"ns","name":{},"service":{{"ports":[]}}}}]}}"#,
            serde_json::to_string(&name).unwrap()
        );
        if let Ok(cs) = ChangeSet::from_json(json.as_bytes()) {
            let n = cs.services[0].key.name.as_str();
            prop_assert!(n.len() <= 63);
            prop_assert!(n.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'));
        }
    }

    #[test]
    fn netlink_reply_reader_never_panics(
        bytes in prop::collection::vec(any::<u8>(), 0..400),
        seq0 in any::<u32>(),
        span in 0u32..8,
    ) {
        let _ = read_acks(&bytes, seq0, seq0.saturating_add(span));
    }

    /// Well-framed replies with random kinds, sequence numbers and codes: the acknowledgements
    /// counted are never more than the messages in the datagram, and any refusal of ours wins.
    #[test]
    fn netlink_reply_reader_counts_within_bounds(
        msgs in prop::collection::vec((0u16..5, 98u32..106, prop::sample::select(vec![0i32, -1, -2, -16, -22, 5]), 0usize..12), 0..20),
    ) {
        let mut reply = Vec::new();
        let mut refused = false;
        for (kind, seq, code, extra) in &msgs {
            let len = 20 + extra;
            reply.extend_from_slice(&(len as u32).to_ne_bytes());
            reply.extend_from_slice(&kind.to_ne_bytes());
            reply.extend_from_slice(&[0u8; 2]);
            reply.extend_from_slice(&seq.to_ne_bytes());
            reply.extend_from_slice(&[0u8; 4]);
            reply.extend_from_slice(&code.to_ne_bytes());
            reply.resize(reply.len() + extra + ((4 - len % 4) % 4), 0);
            refused |= *kind == 2 && (100..=103).contains(seq) && *code != 0;
        }
        match read_acks(&reply, 100, 103) {
            Ok(n) => {
                prop_assert!(!refused);
                prop_assert!(n <= msgs.len());
            }
            Err(_) => prop_assert!(refused),
        }
    }

    /// The IPVS dump decoders never panic on arbitrary payloads.
    #[test]
    fn ipvs_decoders_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..300), fam in 0u16..12) {
        let _ = decode_service(&bytes);
        let _ = decode_dest(&bytes, fam);
    }

    /// What kproxy encodes, the decoder reads back exactly (the kernel's dump replies carry
    /// the same nests): any address of either family, protocol, port, scheduler and flags.
    #[test]
    fn ipvs_messages_round_trip(
        v4 in any::<[u8; 4]>(), v6 in any::<[u8; 16]>(), six in any::<bool>(),
        proto in prop::sample::select(vec![Protocol::Tcp, Protocol::Udp, Protocol::Sctp]),
        port in any::<u16>(), dport in any::<u16>(), weight in 0u32..1000,
        sched in "[a-z]{1,15}", flags in prop::sample::select(vec![0u32, 1, 0x10, 0x11]),
        timeout in any::<u32>(),
    ) {
        let addr: IpAddr = if six { v6.into() } else { v4.into() };
        let k = VirtualKey { addr, protocol: proto, port };
        let s = Service { scheduler: sched, flags, timeout };
        let msg = encode(&Op::AddService(k, s.clone()), 0x24, 1, false);
        prop_assert_eq!(decode_service(&msg[16..]), Some((k, s)));
        let d = DestKey { addr, port: dport };
        let msg = encode(&Op::AddDest(k, d, weight), 0x24, 2, false);
        let (got, dest) = decode_dest(&msg[16..], if six { 10 } else { 2 }).unwrap();
        prop_assert_eq!((got, dest.weight), (d, weight));
    }
}
