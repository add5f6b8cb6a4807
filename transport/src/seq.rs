//! Wrap-safe 32-bit sequence number arithmetic (serial number arithmetic, RFC 1982 style).

/// `a < b` in sequence space.
#[inline]
pub fn lt(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) < 0
}

/// `a <= b` in sequence space.
#[inline]
pub fn le(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) <= 0
}

/// `a >= b` in sequence space.
#[inline]
pub fn ge(a: u32, b: u32) -> bool {
    le(b, a)
}

/// `a > b` in sequence space.
#[inline]
pub fn gt(a: u32, b: u32) -> bool {
    lt(b, a)
}

/// Signed distance `a - b`.
#[inline]
pub fn diff(a: u32, b: u32) -> i32 {
    a.wrapping_sub(b) as i32
}

/// True if `lo <= x < hi` in sequence space (with `hi - lo` below 2^31).
#[inline]
pub fn in_range(x: u32, lo: u32, hi: u32) -> bool {
    x.wrapping_sub(lo) < hi.wrapping_sub(lo)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn comparisons_wrap() {
        assert!(lt(0xFFFF_FFFF, 0));
        assert!(lt(0xFFFF_FFF0, 5));
        assert!(gt(5, 0xFFFF_FFF0));
        assert!(le(7, 7));
        assert_eq!(diff(2, 0xFFFF_FFFE), 4);
        assert_eq!(diff(0xFFFF_FFFE, 2), -4);
        assert!(in_range(0, 0xFFFF_FFFE, 3));
        assert!(!in_range(3, 0xFFFF_FFFE, 3));
        assert!(in_range(0xFFFF_FFFE, 0xFFFF_FFFE, 3));
    }
}
