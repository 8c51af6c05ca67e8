//! The content-addressed cache: keys ([`key`]), the local store ([`store`]),
//! its optional copy in an object store ([`remote`]) and content hashes of
//! outside files ([`hash`]).

pub mod hash;
pub mod key;
pub mod remote;
pub mod store;

pub use hash::HashMemo;
pub use key::{CacheKey, Fingerprint};
pub use remote::{Remote, RemoteError};
pub use store::{Manifest, Store};
