//! Host weight pools and the shared pin policy, through the real daemon, with the kernel's own
//! accounting (VmLck, st_blocks) as the witness.

mod common;

use std::os::unix::fs::MetadataExt;

use common::{DaemonBuilder, Scratch, Started, write};
use offloadd::proto::{
    CreatePoolRequest, DeletePoolRequest, GetInfoRequest, GetPoolRequest, ListPoolsRequest,
};
use tonic::Code;

const MIB: u64 = 1 << 20;

fn vm_lck(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    offloadd::parts::parse_kib_field(&status, "VmLck").expect("VmLck in status")
}

fn create(name: &str, size_bytes: u64) -> CreatePoolRequest {
    CreatePoolRequest {
        name: name.into(),
        device: "cpu".into(),
        size_bytes,
    }
}

/// Pinning a test's pools needs CAP_IPC_LOCK or a memlock limit of at least `bytes`; without
/// either the test cannot pass, so it says why and skips.
fn skip_unless_lockable(bytes: u64) -> bool {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let cap_eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0);
    const CAP_IPC_LOCK: u64 = 1 << 14;
    let limit = rustix::process::getrlimit(rustix::process::Resource::Memlock)
        .current
        .unwrap_or(u64::MAX);
    if cap_eff & CAP_IPC_LOCK != 0 || limit >= bytes {
        return false;
    }
    eprintln!(
        "SKIPPED: pinning needs CAP_IPC_LOCK or a memlock limit of {bytes} bytes; this process has neither (limit {limit})"
    );
    true
}

#[tokio::test]
async fn pinned_pool_locks_exactly_its_size() {
    if skip_unless_lockable(24 * MIB + 4096) {
        return;
    }
    let s = Scratch::new();
    let d = DaemonBuilder::new(&s).start().await.unwrap();
    let mut c = d.client().await;
    let before = vm_lck(d.pid());
    // 24 MiB + 4 KiB: not a power of two, so any rounding up would show.
    let size = 24 * MIB + 4096;
    let pool = c
        .create_pool(create("weights", size))
        .await
        .unwrap()
        .into_inner();
    assert!(pool.pinned, "{}", pool.pin_reason);
    assert!(
        pool.pin_reason
            .contains("VLLM_WEIGHT_OFFLOADING_DISABLE_PIN_MEMORY is not set"),
        "{}",
        pool.pin_reason
    );
    assert_eq!(
        vm_lck(d.pid()) - before,
        size,
        "VmLck grows by exactly the pool size"
    );

    let meta = std::fs::metadata(&pool.path).unwrap();
    assert_eq!(meta.len(), size, "pool file has the exact size");
    assert_eq!(
        meta.blocks() * 512,
        size,
        "every page is pre-faulted, none beyond the size"
    );
    assert!(pool.path.starts_with(s.pools_dir().to_str().unwrap()));
    assert_eq!(
        (pool.size_bytes, pool.used_bytes, pool.device.as_str()),
        (size, 0, "cpu")
    );

    let deleted = c
        .delete_pool(DeletePoolRequest {
            name: "weights".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(deleted.name, "weights");
    assert_eq!(vm_lck(d.pid()), before, "unpinned on delete");
    assert!(
        !std::path::Path::new(&pool.path).exists(),
        "file removed on delete"
    );
    let err = c
        .get_pool(GetPoolRequest {
            name: "weights".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert!(d.terminate().await.success());
}

#[tokio::test]
async fn env_variable_disables_pinning_and_is_named() {
    let s = Scratch::new();
    let d = DaemonBuilder::new(&s)
        .env("VLLM_WEIGHT_OFFLOADING_DISABLE_PIN_MEMORY", "1")
        .start()
        .await
        .unwrap();
    let mut c = d.client().await;
    let info = c.get_info(GetInfoRequest {}).await.unwrap().into_inner();
    let cpu = &info.devices[0];
    assert!(
        cpu.capabilities.as_ref().unwrap().pin_available,
        "pinning itself is available"
    );
    let would = cpu.pin_decision.as_ref().unwrap();
    assert!(!would.pin);
    assert!(
        would
            .reason
            .contains("VLLM_WEIGHT_OFFLOADING_DISABLE_PIN_MEMORY"),
        "{}",
        would.reason
    );

    let before = vm_lck(d.pid());
    let pool = c
        .create_pool(create("p", 16 * MIB))
        .await
        .unwrap()
        .into_inner();
    assert!(!pool.pinned);
    assert!(
        pool.pin_reason
            .contains("VLLM_WEIGHT_OFFLOADING_DISABLE_PIN_MEMORY is set"),
        "{}",
        pool.pin_reason
    );
    assert_eq!(
        vm_lck(d.pid()),
        before,
        "nothing locked when the policy says no"
    );
    let meta = std::fs::metadata(&pool.path).unwrap();
    assert_eq!(meta.blocks() * 512, 16 * MIB, "still pre-faulted");
    assert!(d.terminate().await.success());
}

/// Without CAP_IPC_LOCK and with a 64 KiB memlock limit, a pool that fits is pinned and a larger
/// one is created unpinned with the reason; the daemon keeps serving.
#[tokio::test]
async fn tiny_memlock_limit_creates_unpinned_pools_and_explains() {
    if !std::path::Path::new("/usr/sbin/capsh").exists()
        && !std::path::Path::new("/sbin/capsh").exists()
    {
        panic!("capsh (libcap2-bin) is required for this test; .ci/run installs it");
    }
    let s = Scratch::new();
    let d = DaemonBuilder::new(&s)
        .wrapper(&[
            "capsh",
            "--drop=cap_ipc_lock",
            "--",
            "-c",
            "exec prlimit --memlock=65536:65536 \"$@\"",
            "sh",
        ])
        .start()
        .await
        .unwrap();
    let mut c = d.client().await;
    let info = c.get_info(GetInfoRequest {}).await.unwrap().into_inner();
    let caps = info.devices[0].capabilities.clone().unwrap();
    assert!(caps.max_pinnable_bytes <= 65536, "{caps:?}");

    let small = c
        .create_pool(create("small", 32 * 1024))
        .await
        .unwrap()
        .into_inner();
    assert!(small.pinned, "{}", small.pin_reason);
    let big = c
        .create_pool(create("big", 8 * MIB))
        .await
        .unwrap()
        .into_inner();
    assert!(!big.pinned);
    assert!(
        big.pin_reason.contains("RLIMIT_MEMLOCK") && big.pin_reason.contains("CAP_IPC_LOCK"),
        "{}",
        big.pin_reason
    );
    assert_eq!(vm_lck(d.pid()), 32 * 1024);
    let list = c
        .list_pools(ListPoolsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        list.pools
            .iter()
            .map(|p| p.name.as_str())
            .collect::<Vec<_>>(),
        ["big", "small"]
    );
    assert!(d.terminate().await.success());
}

#[tokio::test]
async fn bad_requests_get_precise_statuses() {
    let s = Scratch::new();
    let d = DaemonBuilder::new(&s)
        .arg("--set")
        .arg("pools.max_host_bytes=33554432")
        .start()
        .await
        .unwrap();
    let mut c = d.client().await;
    c.create_pool(create("a", 16 * MIB)).await.unwrap();

    let err = c.create_pool(create("a", MIB)).await.unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");

    let err = c.create_pool(create("b", 17 * MIB)).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    for n in ["17825792", "16777216", "33554432"] {
        assert!(
            err.message().contains(n),
            "message has the numbers: {}",
            err.message()
        );
    }

    let err = c
        .create_pool(CreatePoolRequest {
            name: "b".into(),
            device: "tpu:0".into(),
            size_bytes: MIB,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("tpu:0") && err.message().contains("cpu"),
        "{}",
        err.message()
    );

    for (name, size) in [("../escape", MIB), ("", MIB), ("ok", 0)] {
        let err = c.create_pool(create(name, size)).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{name:?} {size}");
    }
    let err = c
        .delete_pool(DeletePoolRequest {
            name: "nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);

    // Nothing half-created: only the one good pool and its file exist, and the budget is intact.
    let list = c
        .list_pools(ListPoolsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.pools.len(), 1);
    let files: Vec<_> = std::fs::read_dir(s.pools_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        files
            .iter()
            .filter(|f| f.to_string_lossy().starts_with("offloadd-pool-"))
            .count(),
        1,
        "{files:?}"
    );
    c.create_pool(create("b", 16 * MIB))
        .await
        .expect("exactly the remaining budget fits");
    assert!(d.terminate().await.success());
}

#[tokio::test]
async fn a_crash_leaves_journaled_pools_for_adoption_and_sweeps_the_rest() {
    let s = Scratch::new();
    let mut d = DaemonBuilder::new(&s).start().await.unwrap();
    let mut c = d.client().await;
    let pool = c
        .create_pool(create("crashy", 4 * MIB))
        .await
        .unwrap()
        .into_inner();
    // Someone else's file in the same directory must be left alone.
    let foreign = s.pools_dir().join("not-ours");
    write(&foreign, "keep");
    // Static buffers of leases that died with it are ours too, and so is a pool file the
    // journal does not know (a crash between creating it and recording it).
    let static_file = s.pools_dir().join("offloadd-static-deadbeef");
    write(&static_file, "x");
    let unrecorded = s.pools_dir().join("offloadd-pool-unrecorded");
    write(&unrecorded, "y");
    d.child.kill().await.unwrap();
    assert!(
        std::path::Path::new(&pool.path).exists(),
        "SIGKILL leaves the file behind"
    );

    let d = DaemonBuilder::new(&s).start().await.unwrap();
    let mut c = d.client().await;
    let adopted = c
        .get_pool(offloadd::proto::GetPoolRequest {
            name: "crashy".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(adopted.adopted && adopted.path == pool.path, "{adopted:?}");
    assert!(
        !unrecorded.exists(),
        "restart sweeps what the journal does not describe"
    );
    assert!(foreign.exists(), "files without our prefix are untouched");
    assert!(!static_file.exists(), "lease files are swept too");
    assert!(d.logs().contains("left by an earlier run"), "{}", d.logs());
    let logs = d.logs();
    let st = d.terminate().await;
    assert!(st.success(), "{st} {logs}");
}

#[tokio::test]
async fn pools_declared_in_toml_are_created_at_startup() {
    if skip_unless_lockable(3 * MIB) {
        return;
    }
    let s = Scratch::new();
    let cfg = s.path("offloadd.toml");
    write(
        &cfg,
        "[[pools.create]]\nname = \"boot\"\nsize_bytes = 2097152\n\n[[pools.create]]\nname = \"boot2\"\ndevice = \"cpu\"\nsize_bytes = 1048576\n",
    );
    let d = DaemonBuilder::new(&s)
        .arg("--config")
        .arg(cfg.to_str().unwrap())
        .start()
        .await
        .unwrap();
    let mut c = d.client().await;
    let p = c
        .get_pool(GetPoolRequest {
            name: "boot".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(p.size_bytes, 2 * MIB);
    assert!(p.pinned);
    assert_eq!(
        c.list_pools(ListPoolsRequest {})
            .await
            .unwrap()
            .into_inner()
            .pools
            .len(),
        2
    );
    assert!(d.terminate().await.success());

    // A declared pool that cannot be created stops startup with the reason.
    let s2 = Scratch::new();
    let cfg = s2.path("offloadd.toml");
    write(
        &cfg,
        "[pools]\nmax_host_bytes = 1048576\n[[pools.create]]\nname = \"huge\"\nsize_bytes = 2097152\n",
    );
    let Started::Exited { status, stderr } = DaemonBuilder::new(&s2)
        .arg("--config")
        .arg(cfg.to_str().unwrap())
        .try_start()
        .await
        .unwrap()
    else {
        panic!("must not start");
    };
    assert!(!status.success());
    assert!(
        stderr.contains("huge") && stderr.contains("pools.max_host_bytes"),
        "{stderr}"
    );
}

/// Starts a second daemon on `s`'s pools.dir, which must exit; returns what it said, once
/// `first`, still running there, has answered a call.
async fn second_daemon_refused(s: &Scratch, first: &common::Daemon) -> String {
    let other = Scratch::new();
    let Started::Exited { status, stderr } = DaemonBuilder::new(&other)
        .arg("--set")
        .arg(&format!("pools.dir={}", s.pools_dir().display()))
        .try_start()
        .await
        .unwrap()
    else {
        panic!("a second daemon on the same pools.dir must not start");
    };
    assert!(!status.success());
    first
        .client()
        .await
        .list_pools(ListPoolsRequest {})
        .await
        .unwrap();
    stderr
}

#[tokio::test]
async fn two_daemons_never_share_a_pool_directory() {
    let s = Scratch::new();
    let first = DaemonBuilder::new(&s).start().await.unwrap();
    let stderr = second_daemon_refused(&s, &first).await;
    assert!(
        stderr.contains(&format!(
            "another offloadd (pid {}) is using this directory",
            first.pid()
        )),
        "{stderr}"
    );
    assert!(first.terminate().await.success());
}

/// Deleting the owner file used to end the lock for newcomers: a second daemon then shared
/// the directory, adopted the first's pool files and overwrote a model it still served.
#[tokio::test]
async fn deleting_the_lock_file_does_not_let_a_second_daemon_in() {
    use std::os::unix::fs::PermissionsExt as _;
    let s = Scratch::new();
    let first = DaemonBuilder::new(&s).start().await.unwrap();
    let owner = s.pools_dir().join(".offloadd.lock");
    let mode = std::fs::metadata(&owner).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o640, "the owner file tells other users nothing");
    std::fs::remove_file(&owner).unwrap();
    let stderr = second_daemon_refused(&s, &first).await;
    assert!(
        stderr.contains("another offloadd is using this directory"),
        "{stderr}"
    );
    assert!(first.terminate().await.success());
}
