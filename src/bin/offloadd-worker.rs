//! `offloadd-worker`: the reference worker. Attaches to a model and runs a forward-like loop
//! exactly as vLLM's prefetch hooks do — wait for layer k, read its weights from the slot,
//! trigger the prefetch `prefetch_next` names — verifying every tensor's bytes against the
//! checkpoint's checksums, over several passes. Prints JSON lines on stdout.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Parser;
use offloadd::proto::Placement;
use offloadd::worker::Worker;

#[derive(Parser)]
#[command(
    name = "offloadd-worker",
    about = "Reference inference worker for offloadd"
)]
struct Args {
    /// The daemon's Unix socket.
    #[arg(long, default_value = offloadd::config::DEFAULT_UDS_PATH)]
    uds: PathBuf,
    /// Model to attach to.
    #[arg(long)]
    model: String,
    /// Worker name for the daemon's logs.
    #[arg(long, default_value = "offloadd-worker")]
    name: String,
    /// Lease time-to-live (0: the daemon's default).
    #[arg(long, default_value_t = 0)]
    ttl_ms: u64,
    /// Forward passes to run.
    #[arg(long, default_value_t = 3)]
    passes: u32,
    /// Attach, then hold the lease (renewing it) until killed, or until the lease is lost (the
    /// daemon forgot it or was unreachable for a whole ttl): then exit non-zero.
    #[arg(long)]
    hold: bool,
    /// With --hold: never renew, so the lease lapses.
    #[arg(long)]
    no_keepalive: bool,
    /// Also compare every tensor's bytes with this checkpoint (file or directory of shards).
    #[arg(long)]
    checkpoint: Option<PathBuf>,
    /// Onload over the fast path on the same socket instead of the OnloadToStatic RPC.
    #[arg(long)]
    fast: bool,
    /// Instead of verifying, onload every offloaded layer this many times and print GB/s.
    #[arg(long)]
    onload_bench: Option<u32>,
    /// Survive a daemon restart: when the lease is lost mid-pass, attach again (retrying for up
    /// to this many seconds), report the pause, and run the pass again. Prints a line per pass.
    #[arg(long)]
    reattach: Option<u64>,
    /// Instead of verifying, time this many fast-path onloads (offloaded layers in turn) and
    /// print the round trip's p50 and p99 in microseconds.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    latency: Option<u32>,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    match run(Args::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            println!(
                "{}",
                serde_json::json!({"event": "error", "error": format!("{e:#}")})
            );
            eprintln!("offloadd-worker: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<()> {
    let channel = offloadd::client::connect_uds(&args.uds)
        .await
        .context("connect")?;
    let mut w = Worker::attach(channel, &args.model, &args.name, args.ttl_ms).await?;
    println!(
        "{}",
        serde_json::json!({
            "event": "attached",
            "lease_id": w.lease.lease_id,
            "pinned": w.lease.pinned,
            "locked_pool": w.locked_pool(),
            "locked_bytes": w.locked_bytes(),
            "uva_mode": w.lease.uva_mode().as_str_name(),
            "vm_lck_bytes": vm_lck(),
        })
    );
    let every = Duration::from_millis(w.lease.ttl_ms / 3).max(Duration::from_millis(10));
    if args.hold {
        if args.no_keepalive {
            std::future::pending::<()>().await;
        }
        let why = w.spawn_keep_alive(every).await?;
        bail!("stopped holding the lease: {why}");
    }
    let keepalive = w.spawn_keep_alive(every);
    if let Some(rounds) = args.onload_bench {
        let layers = w.lease.offloaded_layers.clone();
        let mut best = 0f64;
        for _ in 0..rounds {
            let t = std::time::Instant::now();
            let mut bytes = 0;
            for &layer in &layers {
                bytes += w.onload(layer).await?.bytes;
            }
            best = best.max(bytes as f64 / t.elapsed().as_secs_f64() / 1e9);
        }
        println!(
            "{}",
            serde_json::json!({"event": "onload_bench", "gbps": best, "layers": layers.len()})
        );
        keepalive.abort();
        w.detach().await?;
        return Ok(());
    }
    if args.fast || args.latency.is_some() {
        w.connect_fast(&args.uds)?;
    }
    if let Some(calls) = args.latency {
        let layers = w.lease.offloaded_layers.clone();
        let mut micros = Vec::with_capacity(calls as usize);
        for &layer in layers.iter().cycle().take(calls as usize) {
            let t = std::time::Instant::now();
            w.onload_fast(layer)?;
            micros.push(t.elapsed().as_secs_f64() * 1e6);
        }
        micros.sort_by(f64::total_cmp);
        let at = |q: f64| micros[((micros.len() - 1) as f64 * q) as usize];
        println!(
            "{}",
            serde_json::json!({"event": "latency", "calls": calls, "p50_us": at(0.5), "p99_us": at(0.99)})
        );
        keepalive.abort();
        w.detach().await?;
        return Ok(());
    }
    let (stats, keepalive) = match args.reattach {
        Some(secs) => {
            keepalive.abort();
            let limit = Duration::from_secs(secs);
            let s = passes_across_restarts(&mut w, args.passes, args.fast, limit).await?;
            (s, w.spawn_keep_alive(every))
        }
        None => (
            forward_passes(&mut w, args.passes, args.fast).await?,
            keepalive,
        ),
    };
    let matched = match &args.checkpoint {
        Some(path) => compare_with_checkpoint(&w, path)?,
        None => 0,
    };
    keepalive.abort();
    println!(
        "{}",
        serde_json::json!({
            "event": "done",
            "passes": args.passes,
            "tensors_verified": stats.tensors,
            "bytes_verified": stats.bytes,
            "onloads": stats.onloads,
            "checkpoint_tensors_matched": matched,
            "vm_lck_bytes": vm_lck(),
        })
    );
    w.detach().await?;
    Ok(())
}

#[derive(Default)]
struct Stats {
    tensors: u64,
    bytes: u64,
    onloads: u64,
}

/// vLLM's prefetch hooks, across a process boundary: the first `slots` offloaded layers are
/// prefetched up front; after offloaded layer k runs, `prefetch_next[k]` is onloaded into the
/// slot k just freed. Every read is checksummed, so a prefetch that overwrote a slot still
/// needed would fail here.
async fn forward_passes(w: &mut Worker, passes: u32, fast: bool) -> Result<Stats> {
    let mut s = Stats::default();
    let offloaded = w.lease.offloaded_layers.clone();
    let next = w.lease.prefetch_next.clone();
    let slots = w.lease.prefetch_slots as usize;
    for &layer in offloaded.iter().take(slots) {
        onload(w, layer, fast).await?;
        s.onloads += 1;
    }
    for _ in 0..passes {
        // DEVICE tensors are copied once into device memory and UVA tensors read in place; on
        // the cpu device both read the pool mapping.
        for t in w
            .tensors()
            .iter()
            .filter(|t| t.placement() != Placement::Prefetch)
        {
            let bytes = w.host_bytes(t)?;
            Worker::verify(t, bytes, "pool")?;
            s.tensors += 1;
            s.bytes += bytes.len() as u64;
        }
        for (k, &layer) in offloaded.iter().enumerate() {
            for t in w.layer_tensors(layer, Placement::Prefetch) {
                let bytes = w.static_bytes(t)?;
                Worker::verify(t, &bytes, "static slot")?;
                s.tensors += 1;
                s.bytes += bytes.len() as u64;
            }
            onload(w, next[k], fast).await?;
            s.onloads += 1;
        }
    }
    Ok(s)
}

/// Forward passes one at a time, attaching again whenever the daemon went away mid-pass; the
/// interrupted pass runs again from the start, so every byte read is verified once more.
async fn passes_across_restarts(
    w: &mut Worker,
    passes: u32,
    fast: bool,
    limit: Duration,
) -> Result<Stats> {
    let mut total = Stats::default();
    let mut done = 0;
    while done < passes {
        match forward_passes(w, 1, fast).await {
            Ok(s) => {
                done += 1;
                total.tensors += s.tensors;
                total.bytes += s.bytes;
                total.onloads += s.onloads;
                println!("{}", serde_json::json!({"event": "pass", "n": done}));
            }
            Err(e) if e.downcast_ref().is_some_and(offloadd::worker::lease_lost) => {
                println!(
                    "{}",
                    serde_json::json!({"event": "lease_lost", "error": format!("{e:#}")})
                );
                let r = w.reattach(limit).await?;
                println!(
                    "{}",
                    serde_json::json!({
                        "event": "reattached",
                        "pause_ms": r.pause.as_secs_f64() * 1e3,
                        "attempts": r.attempts,
                        "kept_pool_mapping": r.kept_pool_mapping,
                        "lease_id": w.lease.lease_id,
                    })
                );
            }
            Err(e) => return Err(e),
        }
    }
    Ok(total)
}

async fn onload(w: &mut Worker, layer: u32, fast: bool) -> Result<()> {
    if fast {
        w.onload_fast(layer)?;
    } else {
        w.onload(layer).await?;
    }
    Ok(())
}

/// Compares every tensor's host copy with the checkpoint on disk, byte for byte.
fn compare_with_checkpoint(w: &Worker, path: &std::path::Path) -> Result<u64> {
    let files: Vec<PathBuf> = if path.is_dir() {
        let mut v: Vec<PathBuf> = std::fs::read_dir(path)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
            .collect();
        v.sort();
        v
    } else {
        vec![path.to_path_buf()]
    };
    let mut matched = 0;
    for f in files {
        let data = std::fs::read(&f).with_context(|| format!("read {}", f.display()))?;
        let st = safetensors::SafeTensors::deserialize(&data)
            .with_context(|| format!("parse {}", f.display()))?;
        for (name, view) in st.tensors() {
            let t = w.tensor(&name)?;
            if w.host_bytes(t)? != view.data() {
                bail!("tensor {name:?} differs from {}", f.display());
            }
            matched += 1;
        }
    }
    if matched != w.tensors().len() as u64 {
        bail!(
            "checkpoint has {matched} tensors, lease has {}",
            w.tensors().len()
        );
    }
    Ok(matched)
}

fn vm_lck() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| offloadd::parts::parse_kib_field(&s, "VmLck"))
        .unwrap_or(0)
}
