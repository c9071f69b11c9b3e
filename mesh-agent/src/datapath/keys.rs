//! Addresses as the kernel maps key them.
#![forbid(unsafe_code)]

use std::net::IpAddr;

use mesh_common::IpKey;

/// The map key of an address (IPv4 mapped into IPv6).
pub fn ip_key(ip: IpAddr) -> IpKey {
    match ip.to_canonical() {
        IpAddr::V4(v4) => IpKey::v4(v4.octets()),
        IpAddr::V6(v6) => IpKey::v6(v6.octets()),
    }
}

/// The address of a map key (IPv4-mapped keys become IPv4).
pub fn ip_from_key(key: &IpKey) -> IpAddr {
    IpAddr::V6(std::net::Ipv6Addr::from(key.addr)).to_canonical()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ip_keys_round_trip() {
        for ip in ["198.18.1.10", "fd18:1::10", "::1", "127.0.0.1"] {
            let ip: IpAddr = ip.parse().expect("test ip");
            assert_eq!(ip_from_key(&ip_key(ip)), ip);
        }
        let mapped: IpAddr = "::ffff:198.18.1.10".parse().expect("test ip");
        assert_eq!(
            ip_key(mapped),
            ip_key("198.18.1.10".parse().expect("test ip"))
        );
    }
}
