//! The image commands through the real binary: create, io, info, map, check,
//! convert (round trip, sparse), and check --repair after an unclean stop.

mod common;

use common::bin::{fvd, ok, s};
use std::path::Path;

fn allocated(p: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(p).unwrap().blocks() * 512
}

#[test]
fn io_info_map_check() {
    let d = tempfile::tempdir().unwrap();
    let base = d.path().join("base.raw");
    std::fs::write(&base, vec![0x11u8; 4 << 20]).unwrap();
    let img = d.path().join("a.fvd");
    ok(&["create", "--base", "base.raw", "--size", "64M", s(&img)]);
    ok(&["io", s(&img), "-c", "write -P 0x22 1M 512k", "-c", "write -P 0x33 32M 1M", "-c", "flush"]);
    ok(&[
        "io",
        s(&img),
        "-c",
        "read -P 0x11 0 1M",
        "-c",
        "read -P 0x22 1M 512k",
        "-c",
        "read -P 0x33 32M 1M",
        "-c",
        "read -P 0 40M 1M",
    ]);
    let (code, _, err) = fvd(&["io", s(&img), "-c", "read -P 0x99 1M 4k"]);
    assert_ne!(code, 0);
    assert!(err.contains("verification failed"), "{err}");
    let info: serde_json::Value = serde_json::from_str(&ok(&["info", "--output", "json", s(&img)])).unwrap();
    assert_eq!(info["virtual-size"], 64 << 20);
    assert_eq!(info["clean"], true);
    assert_eq!(info["allocated-chunks"], 2);
    assert_eq!(info["base"]["format"], "raw");
    assert_eq!(info["data-bytes"], (512 << 10) + (1 << 20));
    let map: serde_json::Value = serde_json::from_str(&ok(&["map", "--output", "json", s(&img)])).unwrap();
    let kinds: Vec<(u64, u64, String)> = map
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["start"].as_u64().unwrap(), r["length"].as_u64().unwrap(), r["kind"].as_str().unwrap().to_string()))
        .collect();
    assert_eq!(kinds[0], (0, 1 << 20, "base".into()));
    assert_eq!(kinds[1], (1 << 20, 512 << 10, "data".into()));
    assert!(kinds.contains(&(32 << 20, 1 << 20, "data".into())), "{kinds:?}");
    let out = ok(&["check", s(&img)]);
    assert!(out.contains("No errors"), "{out}");
    // Discard returns the space and reads zeros over the base too.
    let before = allocated(&img);
    ok(&[
        "io",
        s(&img),
        "-c",
        "discard 32M 1M",
        "-c",
        "discard 0 2M",
        "-c",
        "read -P 0 0 2M",
        "-c",
        "read -P 0 32M 1M",
    ]);
    assert!(allocated(&img) < before, "discard did not shrink the file");
    ok(&["check", s(&img)]);
}

#[test]
fn convert_round_trip_is_sparse_and_exact() {
    let d = tempfile::tempdir().unwrap();
    let raw = d.path().join("in.raw");
    let f = std::fs::File::create(&raw).unwrap();
    f.set_len(256 << 20).unwrap();
    use std::os::unix::fs::FileExt;
    let data: Vec<u8> = (0..(3 << 20)).map(|i: u32| (i.wrapping_mul(2654435761) >> 24) as u8).collect();
    f.write_all_at(&data, 100 << 20).unwrap();
    f.write_all_at(b"tail", (256 << 20) - 4).unwrap();
    drop(f);
    let img = d.path().join("c.fvd");
    let back = d.path().join("out.raw");
    ok(&["convert", "-O", "fvd", s(&raw), s(&img)]);
    ok(&["convert", "-O", "raw", s(&img), s(&back)]);
    assert!(std::fs::read(&raw).unwrap() == std::fs::read(&back).unwrap(), "round trip differs");
    assert!(allocated(&img) < 16 << 20, "fvd copy is not sparse: {}", allocated(&img));
    assert!(allocated(&back) < 16 << 20, "raw copy is not sparse: {}", allocated(&back));
    ok(&["check", s(&img)]);
    // An existing destination is refused.
    let (code, _, err) = fvd(&["convert", "-O", "raw", s(&img), s(&back)]);
    assert_ne!(code, 0);
    assert!(err.contains("exists"), "{err}");
}

#[test]
fn check_reports_and_repairs_leaks() {
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("a.fvd");
    ok(&["create", "--size", "64M", s(&img)]);
    ok(&["io", s(&img), "-c", "write -P 0x44 0 3M"]);
    // Write data into an unreferenced chunk behind fvd's back: a leak.
    let h = fvd::format::Header::decode(&std::fs::read(&img).unwrap()[..4096]).unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
    use std::os::unix::fs::FileExt;
    f.write_all_at(&[0xEE; 65536], h.data_offset + 3 * (1 << 20)).unwrap();
    drop(f);
    // Chunk 3 is past the high-water mark: reference chunk 4 from guest
    // chunk 10, so that chunk 3 lies below the mark, unreferenced, with data.
    common::patch_table_sealed(&img, 10, 5);
    let (code, out, _) = fvd(&["check", s(&img)]);
    assert_eq!(code, 3, "{out}");
    assert!(out.contains("Leaked"), "{out}");
    let (code, out, _) = fvd(&["check", "--repair", s(&img)]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("Repair done"), "{out}");
    ok(&["io", s(&img), "-c", "read -P 0x44 0 3M"]);
}

#[test]
fn resize_grows_and_refuses_what_it_cannot_do() {
    let d = tempfile::tempdir().unwrap();
    let base = d.path().join("base.raw");
    std::fs::write(&base, vec![0x11u8; 4 << 20]).unwrap();
    let img = d.path().join("a.fvd");
    ok(&["create", "--base", "base.raw", "--size", "64M", "--journal-size", "1M", s(&img)]);
    ok(&["io", s(&img), "-c", "write -P 0x22 1M 512k", "-c", "write -P 0x33 63M 1M"]);
    let grown = |out: &str| -> serde_json::Value { serde_json::from_str(out).unwrap() };
    // Within the table's room (1024 entries): header only.
    let r = grown(&ok(&["resize", "--output", "json", s(&img), "1G"]));
    assert_eq!((r["kind"].as_str(), r["new-size"].as_u64()), (Some("header"), Some(1 << 30)), "{r}");
    // Past it: the metadata moves, with room for the table to double.
    let r = grown(&ok(&["resize", "--output", "json", s(&img), "+3G"]));
    assert_eq!((r["kind"].as_str(), r["new-size"].as_u64()), (Some("moved-metadata"), Some(4 << 30)), "{r}");
    assert!(r["room"].as_u64().unwrap() >= 8 << 30, "{r}");
    let out = ok(&["resize", s(&img), "6G"]);
    assert!(out.contains("header only"), "{out}");
    let out = ok(&["resize", s(&img), "6G"]);
    assert!(out.contains("nothing to do"), "{out}");
    ok(&[
        "io",
        s(&img),
        "-c",
        "read -P 0x11 0 1M",
        "-c",
        "read -P 0x22 1M 512k",
        "-c",
        "read -P 0x33 63M 1M",
        "-c",
        "read -P 0 64M 64M",
        "-c",
        "write -P 0x44 5G 1M",
        "-c",
        "read -P 0x44 5G 1M",
    ]);
    let info: serde_json::Value = serde_json::from_str(&ok(&["info", "--output", "json", s(&img)])).unwrap();
    assert_eq!(info["virtual-size"], 6u64 << 30);
    assert!(ok(&["check", s(&img)]).contains("No errors"));
    // Shrinking, a frozen layer, -n: one clear line each, nothing changed.
    let (code, _, err) = fvd(&["resize", s(&img), "1G"]);
    assert_ne!(code, 0);
    assert!(err.contains("shrinking is not supported") && err.lines().count() == 1, "{err}");
    // Online: no device 7 here, one line saying so.
    let (code, _, err) = fvd(&["resize", "-n", "7", "8G"]);
    assert_ne!(code, 0);
    assert!(err.contains('7') && err.lines().count() == 1, "{err}");
    let top = d.path().join("b.fvd");
    ok(&["snapshot", s(&img), s(&top)]);
    let (code, _, err) = fvd(&["resize", s(&img), "8G"]);
    assert_ne!(code, 0);
    assert!(err.contains("frozen snapshot layer"), "{err}");
    // The overlay grows past its frozen base's size: blocks past it read zeros.
    ok(&["resize", s(&top), "8G"]);
    ok(&["io", s(&top), "-c", "read -P 0x22 1M 512k", "-c", "read -P 0x44 5G 1M", "-c", "read -P 0 7G 1M"]);
    let raw = d.path().join("r.fvd");
    ok(&["create", "--size", "16M", "--no-table", s(&raw)]);
    ok(&["io", s(&raw), "-c", "write -P 0x55 15M 1M"]);
    ok(&["resize", s(&raw), "1G"]);
    ok(&["io", s(&raw), "-c", "read -P 0x55 15M 1M", "-c", "read -P 0 16M 16M"]);
}

/// Completions and man pages come from the command line's definitions, and
/// `--log-format json` logs one JSON object per line.
#[test]
fn completions_manpages_and_json_logs() {
    let bash = ok(&["completions", "bash"]);
    assert!(bash.contains("_fvd()") && bash.contains("resize"), "no fvd completion function");
    let st = std::process::Command::new("bash").arg("-n").arg("-c").arg(&bash).status().unwrap();
    assert!(st.success(), "the bash completion script does not parse");
    for sh in ["zsh", "fish"] {
        assert!(ok(&["completions", sh]).contains("snapshot"), "{sh}");
    }
    let d = tempfile::tempdir().unwrap();
    let man = d.path().join("man");
    let listed = ok(&["manpages", s(&man)]);
    for page in ["fvd.1", "fvd-start.1", "fvd-stop.1", "fvd-resize.1"] {
        let text = std::fs::read_to_string(man.join(page)).unwrap();
        assert!(text.starts_with(".ie") || text.contains(".TH"), "{page} is not a man page");
        assert!(listed.contains(page), "{page} not listed: {listed}");
    }
    assert!(std::fs::read_to_string(man.join("fvd-stop.1")).unwrap().contains("image"));

    // `convert` logs what it wrote at info: one JSON object per line.
    let raw = d.path().join("src.raw");
    std::fs::write(&raw, vec![0x5au8; 1 << 20]).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_fvd"))
        .args(["--log-format", "json", "convert", s(&raw)])
        .arg(d.path().join("j.fvd"))
        .env("RUST_LOG", "fvd=info")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let err = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(lines.iter().any(|l| l.contains("convert wrote non-zero data")), "{err}");
    for l in &lines {
        let v: serde_json::Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"));
        assert!(v.get("level").is_some() && v.get("timestamp").is_some(), "{l}");
    }
    // Without RUST_LOG asking for more, the default filter stays at warnings.
    let (code, _, err) = fvd(&["--log-format", "text", "info", s(&d.path().join("missing.fvd"))]);
    assert_ne!(code, 0);
    assert!(err.contains("missing.fvd"), "{err}");
}
