//! IP networks in CIDR form, for `trusted_proxies` and allowlists.

use std::net::IpAddr;

/// An IP network: an address and a prefix length. A bare address is a /32 or /128.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IpNet {
    addr: IpAddr,
    prefix: u8,
}

impl IpNet {
    /// Parses `10.0.0.0/8`, `::1`, `192.168.1.7`.
    pub fn parse(s: &str) -> Result<Self, String> {
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr.trim().parse().map_err(|_| {
            format!("{s:?} is not an IP address or CIDR network such as \"10.0.0.0/8\"")
        })?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => match p.trim().parse::<u8>() {
                Ok(p) if p <= max => p,
                _ => return Err(format!("{s:?} has an invalid prefix length (0 to {max})")),
            },
        };
        Ok(IpNet { addr, prefix })
    }

    /// The same network written one way: an IPv4-mapped IPv6 network as IPv4, host bits
    /// cleared (`10.0.0.5/8` is `10.0.0.0/8`).
    pub fn canonical(self) -> IpNet {
        let (addr, prefix) = match self.addr {
            IpAddr::V6(v6) if self.prefix >= 96 => match v6.to_ipv4_mapped() {
                Some(v4) => (IpAddr::V4(v4), self.prefix - 96),
                None => (self.addr, self.prefix),
            },
            a => (a, self.prefix),
        };
        let addr = match addr {
            IpAddr::V4(a) => IpAddr::V4(
                (u32::from(a) & u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0)).into(),
            ),
            IpAddr::V6(a) => IpAddr::V6(
                (u128::from(a) & u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0))
                    .into(),
            ),
        };
        IpNet { addr, prefix }
    }

    /// The single address this network is, when its prefix is the whole address.
    pub fn single(&self) -> Option<IpAddr> {
        let max = if self.addr.is_ipv4() { 32 } else { 128 };
        (self.prefix == max).then_some(self.addr)
    }

    /// True when `ip` is inside this network. IPv4-mapped IPv6 addresses match IPv4 networks.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

/// `10.0.0.1` for a single address, `10.0.0.0/8` for a network.
impl std::fmt::Display for IpNet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.single() {
            Some(a) => write!(f, "{a}"),
            None => write!(f, "{}/{}", self.addr, self.prefix),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidr_table() {
        let cases = [
            ("10.0.0.0/8", "10.1.2.3", true),
            ("10.0.0.0/8", "11.0.0.1", false),
            ("127.0.0.1", "127.0.0.1", true),
            ("127.0.0.1", "127.0.0.2", false),
            ("0.0.0.0/0", "8.8.8.8", true),
            ("::1", "::1", true),
            ("fd00::/8", "fd12::1", true),
            ("10.0.0.0/8", "::ffff:10.0.0.1", true),
        ];
        for (net, ip, want) in cases {
            let n = IpNet::parse(net).unwrap();
            assert_eq!(n.contains(ip.parse().unwrap()), want, "{net} contains {ip}");
        }
        assert!(IpNet::parse("10.0.0.0/33").is_err());
        assert!(IpNet::parse("example.com").is_err());
    }
}
