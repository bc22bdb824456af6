//! DNS membership against a DNS responder this test runs on loopback (issue #4): three nodes
//! on 127.0.0.1/.2/.3, same port, found through one name.

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use tribes::membership::{dns_member_id, DnsConfig, DnsMembershipInterceptor, Resolver};
use tribes::{GroupChannel, Levels, SendOptions};
use tribes_suite::{wait_until, DnsResponder};

#[test]
fn nodes_find_each_other_through_a_dns_name_and_leave_when_it_drops_them() {
    let ips: Vec<Ipv4Addr> = (1..=3).map(|i| Ipv4Addr::new(127, 0, 0, i)).collect();
    let dns = DnsResponder::start(ips.clone());
    // All nodes listen on one port, as DNS membership requires; take one free on 127.0.0.1.
    let port = tribes_suite::free_port();
    let nodes: Vec<GroupChannel> = ips
        .iter()
        .map(|ip| {
            let ch = GroupChannel::builder()
                .name(format!("dns{}", ip.octets()[3]))
                .address(IpAddr::V4(*ip))
                .port(port)
                .heartbeat_interval(None)
                .unique_id(dns_member_id(IpAddr::V4(*ip)))
                .interceptor(DnsMembershipInterceptor::new(DnsConfig {
                    name: "tribes.test.local".into(),
                    expiration: Duration::from_millis(200),
                    resolver: Resolver::Server(dns.addr),
                }))
                .build()
                .unwrap();
            ch.start(Levels::DEFAULT).unwrap();
            ch
        })
        .collect();
    for n in &nodes {
        n.heartbeat();
    }
    for n in &nodes {
        assert!(
            n.wait_for_members(2, Duration::from_secs(2)),
            "{} sees {:?}",
            n.local_member(),
            n.members()
        );
        // The ids others computed for this node are the one it uses itself.
        assert!(nodes
            .iter()
            .filter(|o| o.local_member() != n.local_member())
            .all(|o| o.members().contains(&n.local_member())));
    }
    // Members found by DNS are reachable.
    let to = nodes[0].members();
    nodes[0]
        .send(
            &to,
            &b"hello"[..],
            SendOptions::USE_ACK | SendOptions::SYNCHRONIZED_ACK,
        )
        .unwrap();

    // .3 leaves DNS: after the expiration, the next poll drops it.
    dns.answers.lock().pop();
    nodes[2].stop(Levels::ALL).unwrap();
    std::thread::sleep(Duration::from_millis(250));
    nodes[0].heartbeat();
    nodes[0].heartbeat();
    assert!(wait_until(Duration::from_secs(2), || nodes[0]
        .members()
        .len()
        == 1));
}
