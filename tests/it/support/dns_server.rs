//! An authoritative DNS server for `srv.test.` on 127.0.0.1 (UDP and TCP,
//! same port), run by hickory-server in this process.

use std::net::{Ipv4Addr, SocketAddr};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use hickory_server::Server;
use hickory_server::proto::rr::rdata::{A, SOA, SRV};
use hickory_server::proto::rr::{LowerName, Name, RData, Record};
use hickory_server::store::in_memory::InMemoryZoneHandler;
use hickory_server::zone_handler::{AxfrPolicy, Catalog, ZoneType};

pub enum Entry {
    Srv(&'static str, u16, &'static str),
    A(&'static str, Ipv4Addr),
}

pub async fn start(entries: &[Entry]) -> (SocketAddr, Server<Catalog>) {
    let origin = Name::from_str("srv.test.").expect("origin");
    let mut zone: InMemoryZoneHandler =
        InMemoryZoneHandler::empty(origin.clone(), ZoneType::Primary, AxfrPolicy::Deny);
    let soa = SOA::new(
        Name::from_str("ns.srv.test.").expect("ns"),
        Name::from_str("admin.srv.test.").expect("admin"),
        1,
        3600,
        600,
        86400,
        60,
    );
    zone.upsert_mut(Record::from_rdata(origin.clone(), 60, RData::SOA(soa)), 1);
    for entry in entries {
        let record = match entry {
            Entry::Srv(name, port, target) => Record::from_rdata(
                Name::from_str(name).expect("srv name"),
                60,
                RData::SRV(SRV::new(
                    10,
                    5,
                    *port,
                    Name::from_str(target).expect("target"),
                )),
            ),
            Entry::A(name, ip) => {
                Record::from_rdata(Name::from_str(name).expect("a name"), 60, RData::A(A(*ip)))
            }
        };
        assert!(zone.upsert_mut(record, 1), "record inserted");
    }
    let mut catalog = Catalog::new();
    catalog.upsert(LowerName::new(&origin), vec![Arc::new(zone)]);
    let mut server = Server::new(catalog);
    let udp = tokio::net::UdpSocket::bind("127.0.0.1:0")
        .await
        .expect("udp");
    let addr = udp.local_addr().expect("addr");
    let tcp = tokio::net::TcpListener::bind(addr)
        .await
        .expect("tcp on the same port");
    server.register_socket(udp);
    server.register_listener(tcp, Duration::from_secs(5), 4096);
    (addr, server)
}
