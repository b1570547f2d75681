//! Types and names shared by `lb`'s eBPF programs and its userspace.
//!
//! Everything that crosses the kernel boundary is `#[repr(C)]`, has explicit
//! padding, and a compile-time size check; with the `user` feature,
//! `bytemuck::Pod` is derived for it (which fails to compile on implicit
//! padding) and `aya::Pod` follows from that. Every map name used on either
//! side is a `pub const` in [`maps`].
#![no_std]

#[cfg(feature = "user")]
extern crate std;

pub mod conn;
#[cfg(feature = "user")]
pub mod files;
pub mod guard;
#[cfg(feature = "user")]
pub mod host;
pub mod maps;
pub mod packet;
pub mod stats;

/// `aya::Pod` for types whose derived `bytemuck::Pod` proves them plain
/// data: `repr(C)`, no padding, every bit pattern valid.
#[cfg(feature = "user")]
#[macro_export]
macro_rules! pod {
    ($($t:ty),* $(,)?) => {
        $(
            const _: fn() = || {
                fn plain<T: bytemuck::Pod>() {}
                plain::<$t>();
            };
            // SAFETY: `$t: bytemuck::Pod` (checked just above by its derive).
            unsafe impl aya::Pod for $t {}
        )*
    };
}
