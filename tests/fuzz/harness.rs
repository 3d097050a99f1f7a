//! The fuzz runner: seeded cases, each run under `catch_unwind`, with its error checked for
//! one line naming the file; an allocation guard that counts (and above a ceiling refuses)
//! huge allocations; and a watchdog that ends the process, naming the case, when one hangs.

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::alloc::{GlobalAlloc, Layout, System};
use std::io::Write;
use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// An allocation above this is counted against the case that made it: no loader needs that
/// much for the small fixtures fuzzed here, so it can only come from a size the input declared.
pub const HUGE: usize = 256 << 20;
/// An allocation above this is refused (the process then aborts, naming the cases in flight),
/// so that a loader trusting a declared size cannot take the machine's memory first.
const CEILING: usize = 2 << 30;
/// A case running longer than this is taken for a hang: the watchdog names it and aborts.
/// `SAGAN_FUZZ_HANG_SECS` changes it (the watchdog's own test sets 1).
fn hang_limit() -> Duration {
    let secs = std::env::var("SAGAN_FUZZ_HANG_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    Duration::from_secs(secs)
}

/// The test binary's allocator: the system's, watched.
pub struct GuardedAlloc;

/// Huge allocations made on threads that run no case (threads a loader spawned): they count
/// against every case in flight. Those made on a case's own thread count in its slot only.
static UNATTRIBUTED: AtomicUsize = AtomicUsize::new(0);
static LARGEST: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// The slot of the case this thread runs, or `SLOTS` (none). A constant initialiser and no
    /// destructor: reading it allocates nothing, so the allocator may.
    static CASE_SLOT: std::cell::Cell<usize> = const { std::cell::Cell::new(SLOTS) };
}

fn admit(size: usize) -> bool {
    if size > HUGE {
        LARGEST.fetch_max(size, Ordering::SeqCst);
        match CASE_SLOT.try_with(|s| s.get()).unwrap_or(SLOTS) {
            SLOTS => UNATTRIBUTED.fetch_add(1, Ordering::SeqCst),
            slot => FLIGHT[slot].huge.fetch_add(1, Ordering::SeqCst),
        };
    }
    if size > CEILING {
        // Formatting integers into stderr allocates nothing.
        let mut err = std::io::stderr();
        let _ = writeln!(err, "fuzz: refusing an allocation of {size} bytes");
        in_flight(&mut err);
        return false;
    }
    true
}

unsafe impl GlobalAlloc for GuardedAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if !admit(layout.size()) {
            return std::ptr::null_mut();
        }
        System.alloc(layout)
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if !admit(layout.size()) {
            return std::ptr::null_mut();
        }
        System.alloc_zeroed(layout)
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if !admit(new_size) {
            return std::ptr::null_mut();
        }
        System.realloc(ptr, layout, new_size)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
}

/// What each running fuzz loop is doing, readable without allocating (from the allocator and
/// the watchdog). One slot per loader test.
struct Slot {
    name: OnceLock<&'static str>,
    seed: AtomicU64,
    /// The case running, or `IDLE`.
    case: AtomicU64,
    started_ms: AtomicU64,
    /// Huge allocations made on the case's own thread.
    huge: AtomicUsize,
}

const IDLE: u64 = u64::MAX;
const SLOTS: usize = 16;
static FLIGHT: [Slot; SLOTS] = [const {
    Slot {
        name: OnceLock::new(),
        seed: AtomicU64::new(0),
        case: AtomicU64::new(IDLE),
        started_ms: AtomicU64::new(0),
        huge: AtomicUsize::new(0),
    }
}; SLOTS];

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn now_ms() -> u64 {
    epoch().elapsed().as_millis() as u64
}

fn in_flight(out: &mut impl Write) {
    for slot in &FLIGHT {
        let case = slot.case.load(Ordering::SeqCst);
        if case != IDLE {
            let _ = writeln!(
                out,
                "fuzz: in flight: {} case {case} (reproduce: SAGAN_FUZZ_SEED={} SAGAN_FUZZ_CASE={case})",
                slot.name.get().copied().unwrap_or("?"),
                slot.seed.load(Ordering::SeqCst)
            );
        }
    }
}

fn start_watchdog() {
    static STARTED: OnceLock<()> = OnceLock::new();
    STARTED.get_or_init(|| {
        let limit = hang_limit();
        std::thread::spawn(move || loop {
            std::thread::sleep(Duration::from_millis(250));
            let now = now_ms();
            let hung = FLIGHT.iter().any(|s| {
                s.case.load(Ordering::SeqCst) != IDLE
                    && now.saturating_sub(s.started_ms.load(Ordering::SeqCst))
                        > limit.as_millis() as u64
            });
            if hung {
                let mut err = std::io::stderr();
                let _ = writeln!(
                    err,
                    "fuzz: a case ran longer than {limit:?}: taken for a hang"
                );
                in_flight(&mut err);
                std::process::abort();
            }
        });
    });
}

/// The last panic's message and location, as the hook saw it (panics in threads a loader
/// spawns are caught where they are joined, so a thread-local would miss them).
static LAST_PANIC: Mutex<Option<String>> = Mutex::new(None);

fn install_panic_hook() {
    static INSTALLED: OnceLock<()> = OnceLock::new();
    INSTALLED.get_or_init(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            *LAST_PANIC.lock().unwrap_or_else(|e| e.into_inner()) = Some(info.to_string());
            // A test's own failing assertion is reported as usual.
            if CASE_SLOT.with(|c| c.get()) == SLOTS {
                default(info);
            }
        }));
    });
}

/// What one case did. `Err` holds the loader's error as the user would read it.
pub struct Outcome {
    pub result: Result<(), String>,
    /// The file the error must name.
    pub path: PathBuf,
}

/// How each case was mutated, for the failure report.
pub type Case = (String, Outcome);

/// Everything a loader's fuzz run saw.
#[derive(Debug, Default)]
pub struct Report {
    pub name: &'static str,
    pub seed: u64,
    pub cases: u64,
    pub loaded: u64,
    pub refused: u64,
    /// Panics, errors of more than one line or not naming the file, huge allocations.
    pub failures: Vec<String>,
    pub panics: u64,
    pub bad_errors: u64,
    pub huge_allocations: u64,
    pub elapsed: Duration,
    pub slowest: (Duration, u64),
}

impl Report {
    /// One line for the log: counts and time.
    pub fn summary(&self) -> String {
        format!(
            "fuzz {} (seed {}): {} cases ({} loaded, {} refused) in {:.2} s (slowest case {} took {} ms); {} panics, {} bad errors, {} huge allocations",
            self.name,
            self.seed,
            self.cases,
            self.loaded,
            self.refused,
            self.elapsed.as_secs_f64(),
            self.slowest.1,
            self.slowest.0.as_millis(),
            self.panics,
            self.bad_errors,
            self.huge_allocations
        )
    }

    /// Fails the test unless every case ended in a load or a clean error, and both happened:
    /// a run where nothing loads (or nothing fails) is not testing the loader.
    pub fn assert_clean(&self) {
        println!("{}", self.summary());
        // Up to ten of each kind, so that one kind cannot hide the others.
        let shown: Vec<&str> = ["PANIC", "error is not", "allocated more"]
            .iter()
            .flat_map(|kind| {
                self.failures
                    .iter()
                    .filter(move |f| f.contains(kind))
                    .take(10)
            })
            .map(String::as_str)
            .collect();
        assert!(
            self.failures.is_empty(),
            "{}\n{}",
            self.summary(),
            shown.join("\n")
        );
        assert!(
            self.loaded > 0 && self.refused > 0,
            "{}: every case loaded or every case failed: the mutations miss the loader",
            self.summary()
        );
    }
}

/// A fuzz run of one loader: `cases` seeded cases in slot `slot` (unique per loader test).
pub struct Fuzz {
    pub name: &'static str,
    pub slot: usize,
    pub cases: u64,
}

/// The base seed: `SAGAN_FUZZ_SEED`, else a fixed one so that CI runs are reproducible.
pub fn base_seed() -> u64 {
    std::env::var("SAGAN_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5a6a_2026)
}

/// `SAGAN_FUZZ_SCALE` multiplies every loader's case count (e.g. 10 for a longer local run).
fn scale() -> f64 {
    std::env::var("SAGAN_FUZZ_SCALE")
        .ok()
        .and_then(|s| s.parse().ok())
        .filter(|s: &f64| s.is_finite() && *s > 0.0)
        .unwrap_or(1.0)
}

impl Fuzz {
    /// Runs every case; `case` gets the case's own RNG (seed and case number fix it) and
    /// returns how it mutated the input and what the loader did. `SAGAN_FUZZ_CASE=N` runs case
    /// N alone.
    pub fn run(&self, case: impl FnMut(&mut ChaCha8Rng) -> Case) -> Report {
        let _shared = EXCLUSIVE.read().unwrap_or_else(|e| e.into_inner());
        let cases: Vec<u64> = match std::env::var("SAGAN_FUZZ_CASE")
            .ok()
            .and_then(|s| s.parse().ok())
        {
            Some(only) => vec![only],
            None => (0..((self.cases as f64 * scale()).ceil() as u64)).collect(),
        };
        self.run_cases(cases, case)
    }

    fn run_cases(&self, cases: Vec<u64>, mut case: impl FnMut(&mut ChaCha8Rng) -> Case) -> Report {
        install_panic_hook();
        start_watchdog();
        let seed = base_seed();
        let slot = &FLIGHT[self.slot];
        let _ = slot.name.set(self.name);
        assert_eq!(
            slot.name.get(),
            Some(&self.name),
            "slot {} is taken",
            self.slot
        );
        slot.seed.store(seed, Ordering::SeqCst);
        let mut report = Report {
            name: self.name,
            seed,
            ..Report::default()
        };
        let started = Instant::now();
        for n in cases {
            // Every loader and case gets its own stream, so one case replays alone.
            let mut rng = ChaCha8Rng::seed_from_u64(seed ^ fnv(self.name));
            rng.set_stream(n);
            let huge_before = (
                slot.huge.load(Ordering::SeqCst),
                UNATTRIBUTED.load(Ordering::SeqCst),
            );
            slot.started_ms.store(now_ms(), Ordering::SeqCst);
            slot.case.store(n, Ordering::SeqCst);
            let t = Instant::now();
            CASE_SLOT.with(|c| c.set(self.slot));
            let result = std::panic::catch_unwind(AssertUnwindSafe(|| case(&mut rng)));
            CASE_SLOT.with(|c| c.set(SLOTS));
            let took = t.elapsed();
            slot.case.store(IDLE, Ordering::SeqCst);
            report.cases += 1;
            if took > report.slowest.0 {
                report.slowest = (took, n);
            }
            let id = format!(
                "{} case {n} (SAGAN_FUZZ_SEED={seed} SAGAN_FUZZ_CASE={n})",
                self.name
            );
            let huge_after = (
                slot.huge.load(Ordering::SeqCst),
                UNATTRIBUTED.load(Ordering::SeqCst),
            );
            if huge_after != huge_before {
                report.huge_allocations += 1;
                let what = result.as_ref().map_or("", |(what, _)| what.as_str());
                report.failures.push(format!(
                    "{id}: {what}: allocated more than {HUGE} bytes (largest so far {})",
                    LARGEST.load(Ordering::SeqCst)
                ));
            }
            match result {
                Err(_) => {
                    report.panics += 1;
                    let msg = LAST_PANIC
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .take()
                        .unwrap_or_default();
                    let msg = msg.replace('\n', " ");
                    report.failures.push(format!("{id}: PANIC {msg}"));
                }
                Ok((_, Outcome { result: Ok(()), .. })) => report.loaded += 1,
                Ok((
                    what,
                    Outcome {
                        result: Err(msg),
                        path,
                    },
                )) => {
                    report.refused += 1;
                    let named = msg.contains(&path.display().to_string());
                    if msg.contains(['\n', '\r']) || !named {
                        report.bad_errors += 1;
                        report.failures.push(format!(
                            "{id}: {what}: error is not one line naming {}: {msg:?}",
                            path.display()
                        ));
                    }
                }
            }
        }
        report.elapsed = started.elapsed();
        report
    }
}

/// Held shared by every loader's run, and alone by the harness's self-test: its deliberate
/// huge allocation on a spawned thread would count against whatever case is in flight.
static EXCLUSIVE: std::sync::RwLock<()> = std::sync::RwLock::new(());

/// FNV-1a of a name: each loader's stream of cases differs from the others'.
fn fnv(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The harness must be able to fail: injected panics, multi-line errors, errors that do not
/// name the file and huge allocations are each counted, and nothing else is.
#[test]
fn harness_counts_what_it_must_refuse() {
    let _alone = EXCLUSIVE.write().unwrap_or_else(|e| e.into_inner());
    let path = PathBuf::from("/fuzz/harness-self-test.bin");
    let mut n = 0u64;
    let report = Fuzz {
        name: "harness-self-test",
        slot: SLOTS - 1,
        cases: 20,
    }
    .run_cases((0..20).collect(), |_| {
        n += 1;
        let err = |msg: String| Outcome {
            result: Err(msg),
            path: path.clone(),
        };
        let outcome = match n {
            3 | 9 => panic!("injected panic in case {n}"),
            4 => err(format!("{}: two\nlines", path.display())),
            5 => err("an error naming no file".into()),
            6 => {
                let big = Vec::<u8>::with_capacity(HUGE + 1);
                std::hint::black_box(&big);
                err(format!(
                    "{}: refused after a huge allocation",
                    path.display()
                ))
            }
            7 | 8 => err(format!("{}: a clean refusal", path.display())),
            // On a thread the case spawned, as loaders decode on several.
            10 => std::thread::scope(|scope| {
                scope.spawn(|| std::hint::black_box(Vec::<u8>::with_capacity(HUGE + 1)));
                Outcome {
                    result: Ok(()),
                    path: path.clone(),
                }
            }),
            _ => Outcome {
                result: Ok(()),
                path: path.clone(),
            },
        };
        (format!("self-test {n}"), outcome)
    });
    assert_eq!(report.cases, 20);
    assert_eq!(report.panics, 2, "{report:?}");
    assert_eq!(report.bad_errors, 2, "{report:?}");
    assert_eq!(report.huge_allocations, 2, "{report:?}");
    assert_eq!((report.loaded, report.refused), (13, 5), "{report:?}");
    assert_eq!(report.failures.len(), 6, "{report:?}");
    assert!(
        report.failures[0].contains("PANIC") && report.failures[0].contains("injected panic"),
        "{:?}",
        report.failures
    );
}

/// What cannot be caught in the process, a hang or an allocation past the ceiling, ends it
/// with the case named. The test runs itself in a child process, where `SAGAN_FUZZ_DOOMED`
/// says which of the two to do.
#[test]
fn aborts_name_the_case() {
    if let Ok(doom) = std::env::var("SAGAN_FUZZ_DOOMED") {
        let case: fn() = match doom.as_str() {
            "hang" => || loop {
                std::thread::sleep(Duration::from_millis(10));
            },
            _ => || {
                std::hint::black_box(Vec::<u8>::with_capacity(CEILING + 1));
            },
        };
        let name = if doom == "hang" {
            "harness-hang"
        } else {
            "harness-ceiling"
        };
        Fuzz {
            name,
            slot: SLOTS - 2,
            cases: 1,
        }
        .run(|_| {
            case();
            (
                String::new(),
                Outcome {
                    result: Ok(()),
                    path: PathBuf::new(),
                },
            )
        });
        return;
    }
    for (doom, expected) in [
        ("hang", "taken for a hang"),
        ("allocation", "fuzz: refusing an allocation of"),
    ] {
        let out = std::process::Command::new(std::env::current_exe().expect("test binary"))
            .args(["--exact", "harness::aborts_name_the_case", "--nocapture"])
            .env("SAGAN_FUZZ_DOOMED", doom)
            .env("SAGAN_FUZZ_HANG_SECS", "1")
            .env_remove("SAGAN_FUZZ_CASE")
            .output()
            .expect("running the test binary");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{doom} ended cleanly:\n{stderr}");
        assert!(
            stderr.contains(expected) && stderr.contains(" case 0 (reproduce: SAGAN_FUZZ_SEED="),
            "{doom}:\n{stderr}"
        );
    }
}
