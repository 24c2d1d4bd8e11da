//! What the cases share: one case at a time (they kill services the others use), the table each
//! case adds a row to, peak RSS, and the local services stopped and started as a crash would.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::consistency::Consistency;

/// Held for a whole case: no two cases run at once, whatever the test harness's threads.
pub static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn state() -> PathBuf {
    std::env::var_os("IMAGEINDEX_STATE").map(PathBuf::from).unwrap_or_else(|| root().join(".state"))
}

/// The table `hack/test.sh` and `hack/fault-matrix.sh` print: one line per case.
pub const TABLE: &str = "artifacts/fault-matrix.txt";

fn kib(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with(field)).unwrap_or_else(|| panic!("no {field}"));
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Resident memory now, in MiB.
pub fn rss_mib() -> u64 {
    kib("VmRSS:") / 1024
}

/// Peak resident memory since the last `reset_peak_rss`, in MiB.
pub fn peak_rss_mib() -> u64 {
    kib("VmHWM:") / 1024
}

/// Starts a new peak (Linux: writing 5 to clear_refs resets VmHWM to the current RSS).
pub fn reset_peak_rss() {
    std::fs::write("/proc/self/clear_refs", "5").expect("resetting the peak RSS");
}

/// Adds the case's row to the table, and prints it.
pub fn add_row(case: &str, c: &Consistency) {
    let row = format!(
        "| {case} | {} | {} | {} | {} | {} | {} | {} |",
        c.expected,
        c.indexed,
        c.failed,
        c.lost,
        c.duplicated,
        c.orphans,
        peak_rss_mib()
    );
    eprintln!("{row}");
    let path = state().join(TABLE);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let mut f = std::fs::OpenOptions::new().create(true).append(true).open(path).unwrap();
    writeln!(f, "{row}").unwrap();
}

/// SIGKILLs a service that `hack/services.sh` started (its whole process group): a crash, with
/// no chance to flush or say goodbye.
pub fn kill(service: &str) {
    let pid = std::fs::read_to_string(state().join(format!("{service}.pid"))).unwrap();
    let pid = pid.trim();
    let status = Command::new("kill").args(["-KILL", "--", &format!("-{pid}")]).status().unwrap();
    assert!(status.success(), "kill {service} ({pid})");
    // Gone once the pid answers no more.
    while Command::new("kill").args(["-0", pid]).status().unwrap().success() {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// Starts what is not running, as `hack/test.sh` did, and waits until it answers.
pub async fn restart_services() {
    let status = tokio::process::Command::new(root().join("hack/services.sh")).arg("up").status().await.unwrap();
    assert!(status.success(), "hack/services.sh up");
}
