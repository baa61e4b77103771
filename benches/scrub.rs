//! What the scrubber costs at its default rate (issue #25): a 4 GiB model READY in the real
//! daemon, and the daemon's CPU time and a prober's GetInfo latency over the same window, with
//! the scrubber at its default `models.scrub_bytes_per_second` against the same daemon and model
//! with the scrubber off, in the same run. The scrubber's share of a core is its thread's own
//! CPU time over the window (the scheduler's per-thread clock in /proc, in nanoseconds); the
//! difference in the whole daemon's CPU time is printed beside it, but that is the difference
//! of two windows of a daemon busy answering the prober, and moves by a whole percent of a core
//! on a noisy machine.
//!
//! `cargo bench --bench scrub` (OFFLOADD_BENCH_MODEL_MIB sets the size, default 4096;
//! SCRUB_SECONDS the window, default 30).

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use offloadd::proto::{CreatePoolRequest, GetInfoRequest, GetModelRequest, RegisterModelRequest};

/// One window's figures for one daemon.
struct Window {
    cpu_share: f64,
    /// The scrubber thread's share of a core; None when it does not run.
    scrub_share: Option<f64>,
    p50: Duration,
    p99: Duration,
    scrubbed_bytes: u64,
    wall: Duration,
}

async fn measure(mib: u64, seconds: u64, scrub: Option<&str>) -> Window {
    let work = tempfile::tempdir_in("/var/tmp").unwrap();
    let ckpt = work.path().join("llama");
    std::fs::create_dir_all(&ckpt).unwrap();
    let bytes = common::write_checkpoint(&ckpt, mib);
    let shm = common::shm_dir();
    let uds = work.path().join("offloadd.sock");
    let mut extra = vec![];
    let setting;
    if let Some(rate) = scrub {
        setting = format!("models.scrub_bytes_per_second={rate}");
        extra = vec!["--set", &setting];
    }
    let (mut child, channel, _) =
        common::start_daemon_with(&uds, &shm.path().join("pools"), work.path(), &extra).await;
    let pid = child.id().expect("daemon pid");
    let mut c = offloadd::client::offload(channel);
    c.create_pool(CreatePoolRequest {
        name: "p".into(),
        device: "cpu".into(),
        size_bytes: bytes + (64 << 20),
    })
    .await
    .unwrap();
    c.register_model(RegisterModelRequest {
        name: "m".into(),
        pool: "p".into(),
        path: ckpt.display().to_string(),
        wait: true,
        backend: None,
    })
    .await
    .unwrap();
    // The checkpoint's page cache is not the daemon's; free it so both runs start alike.
    std::fs::remove_dir_all(&ckpt).unwrap();

    let checked =
        |info: offloadd::proto::GetInfoResponse| info.scrub.map_or(0, |s| s.bytes_checked);
    let before = checked(c.get_info(GetInfoRequest {}).await.unwrap().into_inner());
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let cpu_before = common::cpu_time(pid);
    let scrub_before = thread_cpu(pid, SCRUB_THREAD);
    let prober = common::prober(uds.clone(), stop.clone(), None);
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    stop.store(true, Ordering::Relaxed);
    let cpu = common::cpu_time(pid) - cpu_before;
    let scrub_cpu = thread_cpu(pid, SCRUB_THREAD)
        .zip(scrub_before)
        .map(|(after, before)| after - before);
    let wall = started.elapsed();
    let lat = prober.join().unwrap();
    let after = checked(c.get_info(GetInfoRequest {}).await.unwrap().into_inner());
    let model = c
        .get_model(GetModelRequest {
            name: "m".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        model.state(),
        offloadd::proto::ModelState::Ready,
        "the model left READY during the window: {}",
        model.error
    );
    child.kill().await.unwrap();
    Window {
        cpu_share: cpu.as_secs_f64() / wall.as_secs_f64(),
        scrub_share: scrub_cpu.map(|c| c.as_secs_f64() / wall.as_secs_f64()),
        p50: common::pct(&lat, 0.5),
        p99: common::pct(&lat, 0.99),
        scrubbed_bytes: after - before,
        wall,
    }
}

/// The daemon names its scrubber thread so (`core::scrub`).
const SCRUB_THREAD: &str = "offloadd-scrub";

/// CPU time of the thread of process `pid` named `name`, from the first field of its
/// /proc/PID/task/TID/schedstat (nanoseconds on a CPU); None when there is no such thread.
/// The per-thread CPU clocks of clock_gettime(2) are not readable from another process.
fn thread_cpu(pid: u32, name: &str) -> Option<Duration> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .ok()?
        .flatten()
        .find(|t| std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.trim() == name))
        .and_then(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .map(Duration::from_nanos)
}

#[tokio::main]
async fn main() {
    let mib: u64 = std::env::var("OFFLOADD_BENCH_MODEL_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4096);
    let seconds: u64 = std::env::var("SCRUB_SECONDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(30);
    let default_rate = offloadd::config::Config::default()
        .models
        .scrub_bytes_per_second;
    println!(
        "{mib} MiB model, {seconds} s windows; scrubber default rate {} MiB/s",
        default_rate >> 20
    );
    let off = measure(mib, seconds, Some("0")).await;
    let on = measure(mib, seconds, None).await;
    let rate = on.scrubbed_bytes as f64 / on.wall.as_secs_f64();
    assert_eq!(off.scrubbed_bytes, 0, "the scrubber ran while set to 0");
    assert!(
        off.scrub_share.is_none(),
        "a scrubber thread ran while set to 0"
    );
    let own = on
        .scrub_share
        .expect("no offloadd-scrub thread with a readable /proc schedstat at the default rate");
    println!(
        "scrubber off: daemon CPU {:.3}% of a core; GetInfo p50 {:?} p99 {:?}",
        off.cpu_share * 100.0,
        off.p50,
        off.p99
    );
    println!(
        "scrubber on : daemon CPU {:.3}% of a core; GetInfo p50 {:?} p99 {:?}; checked {:.1} MiB/s ({:.2}x the setting)",
        on.cpu_share * 100.0,
        on.p50,
        on.p99,
        rate / (1 << 20) as f64,
        rate / default_rate as f64
    );
    println!(
        "the scrubber's share of a core: {:.3}% (target < 1%), its thread's own CPU time; the whole \
         daemon's difference {:.3}%; GetInfo p99 with it {:.2}x without",
        own * 100.0,
        (on.cpu_share - off.cpu_share) * 100.0,
        on.p99.as_secs_f64() / off.p99.as_secs_f64()
    );
}
