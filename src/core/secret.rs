//! Unguessable identifiers that act as capabilities: whoever holds a publish token may write
//! that publication, and nobody else can.

/// 128 random bits from the kernel, as 32 hex digits.
pub fn token() -> String {
    let mut b = [0u8; 16];
    // getrandom(2) without GRND_NONBLOCK blocks only until the kernel's pool is first seeded,
    // long before a daemon serves; it fails only on a kernel older than 3.17.
    rustix::rand::getrandom(&mut b, rustix::rand::GetRandomFlags::empty())
        .expect("getrandom(2) failed: offloadd needs Linux 3.17 or later");
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn tokens_are_distinct_hex() {
        let (a, b) = (super::token(), super::token());
        assert_ne!(a, b);
        assert_eq!(a.len(), 32);
        assert!(a.bytes().all(|c| c.is_ascii_hexdigit()));
    }
}
