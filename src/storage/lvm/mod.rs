//! LVM logical volumes under an image: names, lvm2's tools, block device
//! operations and the growth policy. [`super::lv::LvStorage`] puts them together.

pub mod blockdev;
pub mod names;
pub mod policy;
pub mod tool;

pub use names::LvName;
pub use policy::Policy;
pub use tool::{ExtendError, LvReport, Lvm};
