//! LVM logical volumes under an image: names, lvm2's tools, its JSON report,
//! the ublk device filter and the growth policy (block device operations:
//! [`super::blockdev`]). [`super::lv::LvStorage`] puts them together.

pub mod filter;
pub mod names;
pub mod policy;
pub mod report;
pub mod tool;

pub use names::LvName;
pub use policy::Policy;
pub use report::LvReport;
pub use tool::{ExtendError, Lvm};
