//! LVM logical volumes under an image: names, lvm2's tools and the growth
//! policy (block device operations: [`super::blockdev`]). [`super::lv::LvStorage`] puts them together.

pub mod names;
pub mod policy;
pub mod tool;

pub use names::LvName;
pub use policy::Policy;
pub use tool::{ExtendError, LvReport, Lvm};
