//! The whole guest's power cut and the run's next phase after it.
//!
//! At the end of a phase run with `--power-cut`, with every writer's requests still in
//! flight, the run holds every device's model (no completion is recorded after this),
//! notes what each block may hold after a power cut (what it held at its last completed
//! flush, anything written since, and what the requests under way may leave), writes
//! that with the chains and the counts to the results folder (the host's, which
//! outlives the guest), tells the guest harness which phase comes next, and reboots the
//! guest at once (sysrq b): the page cache and every dirty buffer of the guest are lost,
//! and the storage keeps what it was told to keep (tests/guest/run: "Power cuts").
//! The next phase (`--resume`) starts every device on its top layer again (the daemon
//! recovers it), reads it whole against that state, and goes on.
//!
//! State grammar (JSON): `{seed, phase, next_value, counts: {name: n},
//! devices: [{index, kind, layers: [path, bottom first], size, sets: [[value]; block]}]}`.

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::MutexGuard;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::dev::{Device, Kind};
use crate::log::Log;
use crate::model::Model;

#[derive(Serialize, Deserialize)]
struct DeviceState {
    index: u32,
    kind: String,
    layers: Vec<String>,
    size: u64,
    sets: Vec<Vec<u64>>,
}

#[derive(Serialize, Deserialize)]
pub struct State {
    seed: u64,
    /// The phase that cut the power (the first is 1).
    phase: u32,
    /// Above every value written so far.
    pub next_value: u64,
    /// Every phase's counts so far, operations and requests.
    pub counts: BTreeMap<String, u64>,
    devices: Vec<DeviceState>,
}

/// The file the state goes to in the results folder.
pub fn state_path(results: &str) -> String {
    format!("{results}/torture-state.json")
}

fn write_synced(path: &str, bytes: &[u8]) -> Result<(), String> {
    let tmp = format!("{path}.tmp");
    let mut f = std::fs::File::create(&tmp).map_err(|e| format!("{tmp}: {e}"))?;
    f.write_all(bytes).map_err(|e| format!("{tmp}: {e}"))?;
    f.sync_all().map_err(|e| format!("{tmp}: {e}"))?;
    std::fs::rename(&tmp, path).map_err(|e| format!("{path}: {e}"))?;
    if let Some(dir) = std::path::Path::new(path).parent() {
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

/// Cuts the power with every device's requests in flight; returns only if the guest
/// is still alive seconds later (an error: no power cut happened).
pub fn cut(
    results: &str,
    seed: u64,
    phase: u32,
    log: &Log,
    devs: &[Device],
    next_value: u64,
    counts: BTreeMap<String, u64>,
) -> String {
    // Every model held from here to the end: a request that completes now is not
    // recorded, so the state below is what the storage may hold at the cut.
    let mut held: Vec<MutexGuard<'_, Model>> = Vec::new();
    for d in devs {
        match d.model.lock() {
            Ok(g) => held.push(g),
            Err(_) => return "a model's lock is poisoned".into(),
        }
    }
    let mut devices = Vec::new();
    for (d, m) in devs.iter().zip(held.iter_mut()) {
        devices.push(DeviceState {
            index: d.index,
            kind: d.kind.name().to_string(),
            layers: d.layers.lock().map(|l| l.clone()).unwrap_or_default(),
            size: d.size.load(std::sync::atomic::Ordering::SeqCst),
            sets: m.power_cut(),
        });
    }
    let state = State { seed, phase, next_value, counts, devices };
    let text = match serde_json::to_vec(&state) {
        Ok(t) => t,
        Err(e) => return format!("the state: {e}"),
    };
    if let Err(e) = write_synced(&state_path(results), &text) {
        return e;
    }
    // The daemons' logs (on tmpfs, which the cut empties) kept for a failure's report.
    let run_dir = std::env::var("FVD_RUN_DIR").unwrap_or_else(|_| "/run/fvd".into());
    let keep = format!("{results}/phase{phase}-daemon-logs");
    if std::fs::create_dir_all(&keep).is_ok() {
        for e in std::fs::read_dir(&run_dir).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if name.ends_with(".log") {
                let _ = std::fs::copy(e.path(), format!("{keep}/{name}"));
            }
        }
    }
    log.line(&format!("power cut: phase {phase} ends with every request in flight; phase {} recovers", phase + 1));
    log.sync();
    if let Err(e) = write_synced(&format!("{results}/powercut"), format!("{}\n", phase + 1).as_bytes()) {
        return e;
    }
    // The reboot: no sync, no unmount, no shutdown; the emulator exits (-no-reboot).
    let _ = std::fs::write("/proc/sys/kernel/sysrq", "1");
    if let Err(e) = std::fs::write("/proc/sysrq-trigger", "b") {
        let _ = std::fs::remove_file(format!("{results}/powercut"));
        return format!("sysrq b: {e}");
    }
    std::thread::sleep(Duration::from_secs(30));
    let _ = std::fs::remove_file(format!("{results}/powercut"));
    "the guest is still up 30 s after sysrq b".into()
}

/// The devices of the phase before the power cut, none served yet.
pub fn load(path: &str, seed: u64) -> Result<(State, Vec<Device>), String> {
    let text = std::fs::read(path).map_err(|e| format!("{path}: {e}"))?;
    let mut state: State = serde_json::from_slice(&text).map_err(|e| format!("{path}: {e}"))?;
    if state.seed != seed {
        return Err(format!("{path} is seed {}'s state, not seed {seed}'s", state.seed));
    }
    let mut devs = Vec::new();
    for d in std::mem::take(&mut state.devices) {
        let kind = Kind::parse(&d.kind).ok_or_else(|| format!("{path}: unknown kind {}", d.kind))?;
        devs.push(Device::new(d.index, kind, d.layers, Model::from_sets(d.sets), d.size));
    }
    Ok((state, devs))
}
