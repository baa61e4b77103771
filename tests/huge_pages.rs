//! Pools on huge pages. A tmpfs pools.dir mounted with `huge=advise` backs a pool with 2 MiB
//! pages only because the daemon asks for them (MADV_HUGEPAGE), at creation and again when a
//! restart adopts the pool; one mounted with `huge=never`, as /dev/shm usually is, does not.
//! GetPool says which, from what the kernel maps; a worker's own mapping of the pool uses them
//! whole as well, without asking. Real binary, real mounts: root only, skipped with the reason
//! otherwise.

mod common;

use common::Daemon;
use common::ckpt;
use common::restart::{Setup, register};
use common::tmpfs::Tmpfs;
use offloadd::proto::GetPoolRequest;
use offloadd::proto::offload_client::OffloadClient;
use offloadd::worker::Worker;
use rustix::process::Signal;
use tonic::transport::Channel;

const MIB: u64 = 1 << 20;
/// A whole number of 2 MiB pages.
const POOL_BYTES: u64 = 32 * MIB;

async fn pool(c: &mut OffloadClient<Channel>) -> offloadd::proto::Pool {
    c.get_pool(GetPoolRequest { name: "p".into() })
        .await
        .unwrap()
        .into_inner()
}

/// Bytes this process maps with huge pages from the file at `path`, from /proc/self/smaps.
fn pmd_mapped(path: &str) -> u64 {
    let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
    let mut inside = false;
    let mut kib = 0;
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if first.contains('-') && first.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
            inside = line.ends_with(path);
            continue;
        }
        if let (true, Some(v)) = (inside, line.strip_prefix("ShmemPmdMapped:")) {
            kib += v.trim_end_matches("kB").trim().parse::<u64>().unwrap();
        }
    }
    kib * 1024
}

async fn kill(mut d: Daemon) {
    d.signal(Signal::KILL);
    d.child.wait().await.unwrap();
}

#[tokio::test]
async fn a_pool_says_how_much_of_it_has_huge_pages_at_creation_and_after_a_restart() {
    for (options, want) in [("huge=advise", POOL_BYTES), ("huge=never", 0)] {
        let setup = Setup::new();
        let Some(_fs) = Tmpfs::mount_with(
            &setup.s.pools_dir(),
            64 * MIB,
            options,
            "a_pool_says_how_much_of_it_has_huge_pages",
        ) else {
            return;
        };
        let path = setup.checkpoint("m", &ckpt::llama(2, 64, 128));
        // Adopted models are READY at once, so the lease below waits only for the pin.
        let start = || setup.daemon().set("models.verify_on_adopt=none").start();
        let d = start().await.unwrap();
        let mut c = d.client().await;
        common::cpu_pool(&mut c, "p", POOL_BYTES).await;
        let created = pool(&mut c).await;
        assert!(created.pinned, "{}", created.pin_reason);
        assert_eq!(created.huge_page_bytes, Some(want), "created on {options}");
        register(&mut c, "m", "p", &path, true).await;
        kill(d).await;

        let d = start().await.unwrap();
        let mut c = d.client().await;
        // A lease waits for the adopted pool's pin, which maps every page of it again. The
        // worker library's lease, in this process, maps the pool too: the kernel maps the pool's
        // huge pages whole there without the worker's MADV_HUGEPAGE.
        let w = Worker::attach(d.channel().await, "m", "huge-pages", 0)
            .await
            .unwrap();
        let adopted = pool(&mut c).await;
        assert!(adopted.adopted && adopted.pinned, "{}", adopted.pin_reason);
        assert_eq!(adopted.huge_page_bytes, Some(want), "adopted on {options}");
        for t in w.tensors() {
            Worker::verify(t, w.host_bytes(t).unwrap(), "pool").unwrap();
        }
        let mapped = pmd_mapped(&adopted.path);
        match want {
            0 => assert_eq!(mapped, 0, "the worker's mapping on {options}"),
            // The model's bytes lie in the pool's first 2 MiB page.
            _ => assert!(mapped >= 2 * MIB, "the worker's mapping: {mapped}"),
        }
        w.detach().await.unwrap();
        assert!(d.terminate().await.success());
    }
}
