//! The content-addressed cache: keys ([`key`]), the store ([`store`]) and
//! content hashes of outside files ([`hash`]).

pub mod hash;
pub mod key;
pub mod store;

pub use hash::HashMemo;
pub use key::{CacheKey, Fingerprint};
pub use store::{Manifest, Store};
