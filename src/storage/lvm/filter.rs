//! Keeping lvm2 off ublk devices: reject patterns for every name of every ublk
//! device, put ahead of the administrator's own `devices/global_filter`.

use std::path::Path;

/// Reject patterns (lvm2 filter syntax) for every ublk block device and all
/// its names: the kernel name, `/dev/block/MAJ:MIN` and udev's links.
///
/// lvm2 reads every device it may find a PV on, and a ublk device's reads are
/// answered by its daemon. A daemon whose I/O thread waits for this very
/// growth could never answer, and lvextend (holding the VG lock) would hang
/// with it; so could another fvd daemon waiting for the same VG lock. lvm2
/// accepts a device when any of its names matches an accept pattern first,
/// so every name gets a reject pattern ahead of the administrator's own.
pub fn ublk_reject_patterns(sys_block: &Path, udev_db: &Path) -> Vec<String> {
    let mut v = vec!["r|^/dev/ublkb[0-9]+(p[0-9]+)?$|".to_string()];
    let Ok(rd) = std::fs::read_dir(sys_block) else {
        return v;
    };
    let mut names: Vec<_> = rd.flatten().map(|e| e.file_name().to_string_lossy().to_string()).collect();
    names.sort();
    for name in names.into_iter().filter(|n| n.starts_with("ublkb")) {
        let Ok(dev) = std::fs::read_to_string(sys_block.join(&name).join("dev")) else {
            continue;
        };
        let dev = dev.trim();
        v.push(exact_reject(&format!("/dev/block/{dev}")));
        if let Ok(db) = std::fs::read_to_string(udev_db.join(format!("b{dev}"))) {
            for link in db.lines().filter_map(|l| l.strip_prefix("S:")) {
                v.push(exact_reject(&format!("/dev/{link}")));
            }
        }
    }
    v
}

/// A pattern that rejects exactly `path`: regex metacharacters become
/// bracket expressions (no backslashes, which lvm.conf strings would need
/// escaped again); the few characters a bracket cannot hold match any one.
/// Grammar: `r|^` (char | `[`meta`]` | `.`)* `$|`.
fn exact_reject(path: &str) -> String {
    let mut re = String::from("r|^");
    for c in path.chars() {
        match c {
            '.' | '+' | '*' | '?' | '(' | ')' | '$' | '{' | '}' => {
                re.push('[');
                re.push(c);
                re.push(']');
            }
            '|' | '[' | ']' | '^' | '\\' | '"' => re.push('.'),
            c => re.push(c),
        }
    }
    re.push_str("$|");
    re
}

/// The `--config` setting: our rejects, then the administrator's patterns.
/// Grammar: `devices/global_filter=[` `"`pattern`"` (`,` `"`pattern`"`)* `]`, with `\` and `"` escaped by `\`.
pub fn filter_config(rejects: &[String], admin: &[String]) -> String {
    let quote = |p: &String| format!("\"{}\"", p.replace('\\', "\\\\").replace('"', "\\\""));
    let items: Vec<String> = rejects.iter().chain(admin.iter()).map(quote).collect();
    format!("devices/global_filter=[{}]", items.join(","))
}

/// Parses a string list as `lvmconfig --valuesonly` prints it: `["a|x|","r|y|"]`.
pub fn parse_string_list(s: &str) -> Option<Vec<String>> {
    let s = s.trim();
    let s = s.split_once('=').map(|(_, v)| v.trim()).filter(|_| !s.starts_with('[')).unwrap_or(s);
    let inner = s.strip_prefix('[')?.strip_suffix(']')?;
    let mut out = Vec::new();
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => {
                let mut item = String::new();
                loop {
                    match chars.next()? {
                        '\\' => item.push(chars.next()?),
                        '"' => break,
                        c => item.push(c),
                    }
                }
                out.push(item);
            }
            ',' | ' ' | '\t' | '\n' => {}
            _ => return None,
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ublk_devices_are_filtered_by_every_name() {
        let d = tempfile::tempdir().unwrap();
        let sys = d.path().join("sys");
        let udev = d.path().join("udev");
        for (n, dev) in [("ublkb0", "259:0"), ("ublkb0p1", "259:1"), ("sda", "8:0")] {
            std::fs::create_dir_all(sys.join(n)).unwrap();
            std::fs::write(sys.join(n).join("dev"), format!("{dev}\n")).unwrap();
        }
        std::fs::create_dir_all(&udev).unwrap();
        std::fs::write(udev.join("b259:0"), "S:fvd/disk.fvd\nS:disk/by-diskseq/9\nE:ID_X=1\n").unwrap();
        std::fs::write(udev.join("b8:0"), "S:disk/by-id/ata-x\n").unwrap();
        let p = ublk_reject_patterns(&sys, &udev);
        assert_eq!(
            p,
            vec![
                "r|^/dev/ublkb[0-9]+(p[0-9]+)?$|",
                "r|^/dev/block/259:0$|",
                "r|^/dev/fvd/disk[.]fvd$|",
                "r|^/dev/disk/by-diskseq/9$|",
                "r|^/dev/block/259:1$|",
            ]
        );
        let admin = parse_string_list(r#"["a|/dev/sd.*|", "r|.*|"]"#).unwrap();
        assert_eq!(admin, vec!["a|/dev/sd.*|", "r|.*|"]);
        assert_eq!(parse_string_list(r#"global_filter=["a|x\"y|"]"#).unwrap(), vec![r#"a|x"y|"#]);
        assert_eq!(parse_string_list("nonsense"), None);
        assert_eq!(
            filter_config(&p[..2], &admin),
            r#"devices/global_filter=["r|^/dev/ublkb[0-9]+(p[0-9]+)?$|","r|^/dev/block/259:0$|","a|/dev/sd.*|","r|.*|"]"#
        );
        assert_eq!(exact_reject("/dev/a|b[c]\\d"), "r|^/dev/a.b.c..d$|");
    }
}
