//! Resource sampling: what the board and the gateway use, read with sysinfo and nothing more.
//!
//! # What one sample reads (Linux)
//!
//! | figure | source | refreshed |
//! | --- | --- | --- |
//! | CPU % | `/proc/stat` | every sample (usage since the previous one) |
//! | memory, swap | `/proc/meminfo` | every sample |
//! | load average | `/proc/loadavg` | every sample |
//! | disk of the data dir | `statvfs` of one mount point | every sample; the mount is found once |
//! | network per interface | `/sys/class/net/*/statistics` | every sample |
//! | own RSS, virtual | `/proc/self/stat{,m}` | every sample, this process only |
//! | own open fds | entries of `/proc/self/fd` | every sample (`None` off Linux) |
//!
//! Never the process table: refreshing every process costs ~25 ms, the above together well under
//! a millisecond (see the `sample_cost` test's printout). [`ResourceSampler::sample`] is
//! blocking but cheap; call it from a blocking-tolerant place (`spawn_blocking` or a
//! dedicated thread) if the interval is short, directly from a task at the default 30 s.
//!
//! # The data directory's filesystem
//!
//! The disk reported is the mounted filesystem whose mount point is the longest prefix of the
//! canonical data directory (its nearest existing ancestor if it does not exist yet). On Unix the
//! choice is confirmed by device id: if the filesystem that really holds the directory is one
//! sysinfo does not list (a `/run` mount, say), `disk` is `None` rather than another filesystem's
//! figures. The mount is looked up again when the directory's device changes (something mounted
//! over it later).
//!
//! CPU % needs two readings: the first sample reports usage since [`ResourceSampler::new`], so
//! sample at least ~200 ms after creating the sampler for a meaningful first figure.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use sysinfo::{
    CpuRefreshKind, DiskRefreshKind, Disks, MemoryRefreshKind, Networks, Pid, ProcessRefreshKind,
    ProcessesToUpdate, System,
};

/// Why resource sampling is unavailable.
#[derive(Debug, thiserror::Error)]
pub enum ResourceError {
    /// sysinfo does not support this platform, or could not initialise.
    #[error("resource monitoring unavailable: {0}")]
    Sysinfo(#[from] sysinfo::Error),
}

/// One reading of the board's and the gateway's resource usage. Byte figures are bytes.
#[derive(Serialize, Clone, Debug, PartialEq)]
pub struct ResourceSample {
    /// When it was taken, Unix milliseconds.
    pub at_ms: u64,
    /// CPU usage of the whole board since the previous sample, 0..=100 (all cores together).
    pub cpu_percent: f32,
    /// 1, 5 and 15 minute load averages (zeros where the platform has none).
    pub load_avg: [f64; 3],
    /// Physical memory.
    pub memory_total: u64,
    /// Memory in use (total minus available).
    pub memory_used: u64,
    /// Memory available to new work without swapping (MemAvailable on Linux).
    pub memory_available: u64,
    /// Swap size.
    pub swap_total: u64,
    /// Swap in use.
    pub swap_used: u64,
    /// The filesystem holding the data directory; `None` if it could not be identified.
    pub disk: Option<DiskUsage>,
    /// Every network interface, sorted by name.
    pub networks: Vec<NetworkUsage>,
    /// The gateway's resident memory.
    pub process_rss: u64,
    /// The gateway's virtual memory size.
    pub process_virtual: u64,
    /// The gateway's open file descriptors (Linux: entries of `/proc/self/fd`); `None` elsewhere.
    pub open_fds: Option<u64>,
}

/// Space on the data directory's filesystem.
#[derive(Serialize, Clone, Debug, PartialEq, Eq)]
pub struct DiskUsage {
    /// Where it is mounted.
    pub mount_point: String,
    /// Its size.
    pub total: u64,
    /// Space an unprivileged writer can still use.
    pub available: u64,
}

/// Traffic of one network interface.
#[derive(Serialize, Clone, Debug, PartialEq)]
pub struct NetworkUsage {
    /// Interface name (`eth0`, `wlan0`, `lo`).
    pub interface: String,
    /// Bytes received since the interface came up.
    pub rx_bytes_total: u64,
    /// Bytes sent since the interface came up.
    pub tx_bytes_total: u64,
    /// Receive rate since the previous sample.
    pub rx_bytes_per_s: f64,
    /// Send rate since the previous sample.
    pub tx_bytes_per_s: f64,
}

/// Holds sysinfo's state between samples (CPU and network figures are deltas).
#[derive(Debug)]
pub struct ResourceSampler {
    /// CPU, memory and this process; only those parts are ever refreshed.
    system: System,
    /// The mount list, of which only [`Self::disk`]'s entry is refreshed per sample.
    disks: Disks,
    /// Interface counters.
    networks: Networks,
    /// This process, for RSS and virtual memory.
    pid: Option<Pid>,
    /// The data directory, canonical where possible (see [`resolve_dir`]).
    data_dir: PathBuf,
    /// Index into `disks` of the data directory's filesystem.
    disk: Option<usize>,
    /// Device id the disk was chosen for; a change means a new mount (Unix only).
    disk_dev: Option<u64>,
    /// When the network counters were last read, for the rates.
    last_network_read: Instant,
}

impl ResourceSampler {
    /// Prepares sampling for the filesystem holding `data_dir`: lists the mounts once, takes the
    /// first CPU and network readings. Costs about a millisecond, more with many mounts.
    pub fn new(data_dir: &Path) -> Result<Self, ResourceError> {
        let mut system = System::new()?;
        system.refresh_cpu_specifics(CpuRefreshKind::nothing().with_usage());
        let networks = Networks::new_with_refreshed_list()?;
        let disks = Disks::new()?;
        let mut sampler = Self {
            system,
            disks,
            networks,
            pid: sysinfo::get_current_pid().ok(),
            data_dir: resolve_dir(data_dir),
            disk: None,
            disk_dev: None,
            last_network_read: Instant::now(),
        };
        sampler.find_disk();
        Ok(sampler)
    }

    /// Takes one sample. Blocking; well under a millisecond on a board (a few `/proc` and
    /// `/sys` reads and one `statvfs`), never a scan of all processes.
    pub fn sample(&mut self) -> ResourceSample {
        self.system
            .refresh_cpu_specifics(CpuRefreshKind::nothing().with_usage());
        self.system
            .refresh_memory_specifics(MemoryRefreshKind::nothing().with_ram().with_swap());
        let (process_rss, process_virtual) = self.process_memory();
        let load = System::load_average().ok();
        ResourceSample {
            at_ms: now_ms(),
            cpu_percent: self.system.global_cpu_usage(),
            load_avg: load.map_or([0.0; 3], |l| [l.one, l.five, l.fifteen]),
            memory_total: self.system.total_memory(),
            memory_used: self.system.used_memory(),
            memory_available: self.system.available_memory(),
            swap_total: self.system.total_swap(),
            swap_used: self.system.used_swap(),
            disk: self.disk_usage(),
            networks: self.network_usage(),
            process_rss,
            process_virtual,
            open_fds: open_fds(),
        }
    }

    fn process_memory(&mut self) -> (u64, u64) {
        let Some(pid) = self.pid else { return (0, 0) };
        self.system.refresh_processes_specifics(
            ProcessesToUpdate::Some(&[pid]),
            false,
            ProcessRefreshKind::nothing().with_memory().without_tasks(),
        );
        self.system
            .process(pid)
            .map_or((0, 0), |p| (p.memory(), p.virtual_memory()))
    }

    fn disk_usage(&mut self) -> Option<DiskUsage> {
        if device_id(&self.data_dir) != self.disk_dev {
            self.data_dir = resolve_dir(&self.data_dir);
            self.find_disk();
        }
        let disk = self.disks.get_mut(self.disk?)?;
        disk.refresh_specifics(DiskRefreshKind::nothing().with_storage());
        Some(DiskUsage {
            mount_point: disk.mount_point().to_string_lossy().into_owned(),
            total: disk.total_space(),
            available: disk.available_space(),
        })
    }

    /// Lists the mounts (without reading their sizes) and picks the data directory's.
    fn find_disk(&mut self) {
        self.disks
            .refresh_specifics(true, DiskRefreshKind::nothing());
        self.disk_dev = device_id(&self.data_dir);
        let best = self
            .disks
            .iter()
            .enumerate()
            .filter(|(_, d)| self.data_dir.starts_with(d.mount_point()))
            .max_by_key(|(_, d)| d.mount_point().components().count())
            .map(|(i, _)| i);
        // The longest listed prefix is wrong when the real filesystem is one sysinfo skips.
        self.disk = best.filter(|&i| {
            let dev = device_id(self.disks[i].mount_point());
            dev.is_none() || self.disk_dev.is_none() || dev == self.disk_dev
        });
        if self.disk.is_none() {
            tracing::debug!(
                data_dir = %self.data_dir.display(),
                "no listed filesystem holds the data directory; disk usage is not reported"
            );
        }
    }

    fn network_usage(&mut self) -> Vec<NetworkUsage> {
        self.networks.refresh(true);
        let now = Instant::now();
        let elapsed = now.duration_since(self.last_network_read).as_secs_f64();
        self.last_network_read = now;
        let rate = |bytes: u64| {
            if elapsed > 0.0 {
                bytes as f64 / elapsed
            } else {
                0.0
            }
        };
        let sorted: BTreeMap<String, &sysinfo::NetworkData> = self
            .networks
            .iter()
            .map(|(name, data)| (name.to_string_lossy().into_owned(), data))
            .collect();
        sorted
            .into_iter()
            .map(|(interface, data)| NetworkUsage {
                interface,
                rx_bytes_total: data.total_received(),
                tx_bytes_total: data.total_transmitted(),
                rx_bytes_per_s: rate(data.received()),
                tx_bytes_per_s: rate(data.transmitted()),
            })
            .collect()
    }
}

/// The canonical form of `dir`, or of its nearest existing ancestor (joined with the rest) when
/// it does not exist yet; relative paths are taken from the working directory.
fn resolve_dir(dir: &Path) -> PathBuf {
    let absolute = if dir.is_absolute() {
        dir.to_path_buf()
    } else {
        std::env::current_dir()
            .map(|cwd| cwd.join(dir))
            .unwrap_or_else(|_| dir.to_path_buf())
    };
    let mut existing = absolute.as_path();
    loop {
        if let Ok(canonical) = existing.canonicalize() {
            return match absolute.strip_prefix(existing) {
                Ok(rest) if !rest.as_os_str().is_empty() => canonical.join(rest),
                _ => canonical,
            };
        }
        match existing.parent() {
            Some(parent) => existing = parent,
            None => return absolute,
        }
    }
}

/// The device id of the filesystem holding `path` (its nearest existing ancestor).
#[cfg(unix)]
fn device_id(path: &Path) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    path.ancestors()
        .find_map(|p| std::fs::metadata(p).ok())
        .map(|m| m.dev())
}

#[cfg(not(unix))]
fn device_id(_path: &Path) -> Option<u64> {
    None
}

/// Open file descriptors of this process: the entries of `/proc/self/fd`, less the one the
/// listing itself holds open.
#[cfg(target_os = "linux")]
fn open_fds() -> Option<u64> {
    let entries = std::fs::read_dir("/proc/self/fd").ok()?;
    let count = u64::try_from(entries.count()).ok()?;
    Some(count.saturating_sub(1))
}

#[cfg(not(target_os = "linux"))]
fn open_fds() -> Option<u64> {
    None
}

/// Wall-clock Unix milliseconds.
fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn two_samples_are_plausible() {
        let dir = tempfile::tempdir().unwrap();
        let mut sampler = ResourceSampler::new(dir.path()).unwrap();
        std::thread::sleep(sysinfo::MINIMUM_CPU_UPDATE_INTERVAL);
        let first = sampler.sample();
        std::thread::sleep(Duration::from_millis(50));
        let second = sampler.sample();
        for s in [&first, &second] {
            assert!(s.memory_total > 0, "{s:?}");
            assert!(s.memory_available <= s.memory_total, "{s:?}");
            assert!(s.memory_used <= s.memory_total, "{s:?}");
            assert!(s.swap_used <= s.swap_total, "{s:?}");
            assert!((0.0..=100.0).contains(&s.cpu_percent), "{s:?}");
            assert!(
                s.process_rss > 0 && s.process_virtual >= s.process_rss,
                "{s:?}"
            );
            let disk = s.disk.as_ref().expect("the tempdir's filesystem is found");
            assert!(disk.total > 0 && disk.available <= disk.total, "{disk:?}");
            assert!(
                resolve_dir(dir.path()).starts_with(&disk.mount_point),
                "{disk:?}"
            );
            for n in &s.networks {
                assert!(n.rx_bytes_per_s >= 0.0 && n.tx_bytes_per_s >= 0.0, "{n:?}");
            }
            if cfg!(target_os = "linux") {
                // stdin/out/err at least, and the test harness's own.
                assert!(s.open_fds.unwrap() >= 3, "{s:?}");
                assert!(s.networks.iter().any(|n| n.interface == "lo"), "{s:?}");
            }
        }
        assert!(second.at_ms >= first.at_ms);
        let names: Vec<&str> = second
            .networks
            .iter()
            .map(|n| n.interface.as_str())
            .collect();
        let mut sorted = names.clone();
        sorted.sort_unstable();
        assert_eq!(names, sorted);
        // It serialises (it is stored as the gateway's own stream).
        let json = serde_json::to_value(&second).unwrap();
        assert!(json["memory_total"].as_u64().unwrap() > 0);
    }

    #[test]
    fn open_fds_follow_opened_files() {
        if !cfg!(target_os = "linux") {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let files: Vec<std::fs::File> = (0..20)
            .map(|i| std::fs::File::create(dir.path().join(i.to_string())).unwrap())
            .collect();
        let with = open_fds().unwrap();
        drop(files);
        let without = open_fds().unwrap();
        // Other tests run in parallel threads and open files too; 20 is well clear of noise.
        assert!(with >= without + 10, "{with} vs {without}");
    }

    #[test]
    fn a_data_dir_that_does_not_exist_yet_resolves_to_its_ancestor() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("not/yet");
        let resolved = resolve_dir(&missing);
        assert_eq!(resolved, dir.path().canonicalize().unwrap().join("not/yet"));
        let mut sampler = ResourceSampler::new(&missing).unwrap();
        assert!(sampler.sample().disk.is_some());
    }

    /// Prints what one sample costs (not asserted: the numbers depend on the machine and build).
    /// `cargo test -p outpost sample_cost -- --nocapture`.
    #[test]
    fn sample_cost() {
        let dir = tempfile::tempdir().unwrap();
        let start = Instant::now();
        let mut sampler = ResourceSampler::new(dir.path()).unwrap();
        let new_cost = start.elapsed();
        sampler.sample();
        const N: u32 = 50;
        let start = Instant::now();
        for _ in 0..N {
            std::hint::black_box(sampler.sample());
        }
        let per_sample = start.elapsed() / N;
        eprintln!(
            "resource sampling: new() {new_cost:?}, sample() {per_sample:?} (mean of {N}, {} build)",
            if cfg!(debug_assertions) {
                "debug"
            } else {
                "release"
            }
        );
    }
}
