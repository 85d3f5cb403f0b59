//! LVM names: validation (lvm2's own rules) and the device-mapper name of an LV.
//!
//! Names reach lvm2's tools only as single arguments of an argument vector,
//! never through a shell; validating them still keeps a name that starts with
//! `-` from being read as an option, and rejects internal sub-LVs (`pool_tdata`)
//! that cannot be extended.

use std::fmt;

/// Longest VG or LV name lvm2 accepts.
pub const MAX_NAME: usize = 127;

/// Substrings lvm2 reserves for the hidden sub-LVs it creates.
const RESERVED_LV_PARTS: &[&str] = &[
    "_cdata", "_cmeta", "_corig", "_cpool", "_cvol", "_iorig", "_mimage", "_mlog", "_pmspare", "_rimage", "_rmeta",
    "_tdata", "_tmeta", "_vdata", "_vorigin", "_wcorig",
];

fn valid_common(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("empty name".into());
    }
    if name.len() > MAX_NAME {
        return Err(format!("name longer than {MAX_NAME} characters"));
    }
    if name == "." || name == ".." {
        return Err(format!("'{name}' is not a valid name"));
    }
    if name.starts_with('-') {
        return Err(format!("'{name}' starts with '-'"));
    }
    if let Some(c) = name.chars().find(|c| !(c.is_ascii_alphanumeric() || "+_.-".contains(*c))) {
        return Err(format!("'{name}' holds '{}': lvm names use only A-Z a-z 0-9 + _ . -", c.escape_default()));
    }
    Ok(())
}

/// A volume group name as lvm2 allows it.
pub fn check_vg_name(name: &str) -> Result<(), String> {
    valid_common(name)
}

/// A logical volume name as lvm2 allows it for a volume users can extend.
pub fn check_lv_name(name: &str) -> Result<(), String> {
    valid_common(name)?;
    if name.starts_with("snapshot") || name.starts_with("pvmove") {
        return Err(format!("'{name}' is a name lvm2 reserves"));
    }
    if let Some(p) = RESERVED_LV_PARTS.iter().find(|p| name.contains(*p)) {
        return Err(format!("'{name}' contains '{p}': an internal sub-volume, not one fvd can grow"));
    }
    Ok(())
}

/// A validated volume group / logical volume pair.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LvName {
    vg: String,
    lv: String,
}

impl LvName {
    pub fn new(vg: &str, lv: &str) -> Result<LvName, String> {
        check_vg_name(vg).map_err(|e| format!("volume group: {e}"))?;
        check_lv_name(lv).map_err(|e| format!("logical volume: {e}"))?;
        Ok(LvName { vg: vg.to_string(), lv: lv.to_string() })
    }

    pub fn vg(&self) -> &str {
        &self.vg
    }

    pub fn lv(&self) -> &str {
        &self.lv
    }

    /// `VG/LV`, the form lvm2's tools take (one argument).
    pub fn arg(&self) -> String {
        format!("{}/{}", self.vg, self.lv)
    }

    /// Another LV of the same volume group (a thin LV's pool).
    pub fn sibling(&self, lv: &str) -> Result<LvName, String> {
        LvName::new(&self.vg, lv)
    }

    /// lvm2's device-mapper name of the LV (`-` doubled inside names; the
    /// inverse of [`split_dm_name`]).
    pub fn dm_name(&self) -> String {
        format!("{}-{}", self.vg.replace('-', "--"), self.lv.replace('-', "--"))
    }
}

impl fmt::Display for LvName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.vg, self.lv)
    }
}

/// Splits the device-mapper name lvm2 gives an LV (`VG-LV`, each `-` inside a
/// name doubled) into its VG and LV. Names of internal layers (`vg-pool-tpool`)
/// have a second separator and give `None`.
pub fn split_dm_name(dm: &str) -> Option<(String, String)> {
    let b = dm.as_bytes();
    let mut parts = vec![String::new()];
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'-' {
            if b.get(i + 1) == Some(&b'-') {
                parts.last_mut()?.push('-');
                i += 2;
                continue;
            }
            parts.push(String::new());
        } else {
            parts.last_mut()?.push(b[i] as char);
        }
        i += 1;
    }
    match <[String; 2]>::try_from(parts) {
        Ok([vg, lv]) if !vg.is_empty() && !lv.is_empty() => Some((vg, lv)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_lvm_rules() {
        for ok in ["vg0", "fvd-test", "a.b_c+d", "x", &"v".repeat(127)] {
            assert!(check_vg_name(ok).is_ok(), "{ok}");
            assert!(check_lv_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", ".", "..", "-vg", "a b", "a/b", "a;rm", "ä", "a\n", &"v".repeat(128)] {
            assert!(check_vg_name(bad).is_err(), "{bad:?}");
            assert!(check_lv_name(bad).is_err(), "{bad:?}");
        }
        for bad in ["snapshot1", "pvmove0", "pool_tdata", "pool_tmeta", "lv_rimage_0", "x_cdata"] {
            assert!(check_lv_name(bad).is_err(), "{bad}");
        }
        assert!(check_vg_name("pool_tdata").is_ok());
        let n = LvName::new("vg", "disk-1").unwrap();
        assert_eq!(n.arg(), "vg/disk-1");
        assert!(LvName::new("vg", "--help").is_err());
        assert!(n.sibling("pool").is_ok());
    }

    #[test]
    fn dm_names_split_at_the_single_dash() {
        assert_eq!(split_dm_name("fvdtest-lin"), Some(("fvdtest".into(), "lin".into())));
        assert_eq!(split_dm_name("fvd--test-lin--x"), Some(("fvd-test".into(), "lin-x".into())));
        assert_eq!(split_dm_name("a---b"), Some(("a-".into(), "b".into())));
        assert_eq!(split_dm_name("vg-pool-tpool"), None);
        assert_eq!(split_dm_name("vg-pool_tdata"), Some(("vg".into(), "pool_tdata".into())));
        assert_eq!(split_dm_name("nodash"), None);
        assert_eq!(split_dm_name("-lv"), None);
        assert_eq!(split_dm_name("vg-"), None);
        assert_eq!(split_dm_name("luks-1234"), Some(("luks".into(), "1234".into())));
        let n = LvName::new("fvd-test", "lin-x").unwrap();
        assert_eq!(n.dm_name(), "fvd--test-lin--x");
        assert_eq!(split_dm_name(&n.dm_name()), Some(("fvd-test".into(), "lin-x".into())));
    }
}
