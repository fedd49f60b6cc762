//! Templates end to end through the `cocoon` CLI, with a template directory of the test's own:
//! two containers started at once into an empty directory make one template between them and
//! come up as clones with identities of their own; a template that fails to load is removed
//! and made again; `--no-template` boots cold and says why; `template rm` leaves nothing.

use std::path::Path;
use std::process::Output;

use serde_json::Value;

use cocoon_tests::cocoon_cli::{Cocoon, bundle, cocoon_binary};
use cocoon_tests::{ONE_VM_AT_A_TIME, Scratch, artifacts_or_skip};

/// What a clone's identity looks like from inside a container: 16 bytes of /dev/urandom, the
/// boot id, a fresh kernel UUID, the hostname.
const IDENTITY: &str = "head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo; \
     cat /proc/sys/kernel/random/boot_id; cat /proc/sys/kernel/random/uuid; hostname";

fn log_of(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

fn templates(cocoon: &Cocoon) -> Vec<Value> {
    let out = cocoon.ok(&["template", "list", "--format", "json"]);
    serde_json::from_str::<Value>(&out)
        .unwrap_or_else(|e| panic!("template list: {e}: {out}"))
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// `cocoon --debug --log LOG run ID` with the bundle; its output.
fn run(cocoon: &Cocoon, bundle: &Path, id: &str, log: &Path, extra: &[&str]) -> Output {
    let mut args = vec![
        "--debug",
        "--log",
        log.to_str().unwrap(),
        "run",
        "--bundle",
        bundle.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    args.push(id);
    cocoon.run(&args)
}

fn assert_ran(out: &Output, id: &str, log: &Path) -> Vec<String> {
    assert!(
        out.status.success(),
        "{id} failed ({}): {}\nlog:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        log_of(log)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

#[test]
fn templates_are_made_once_restored_with_fresh_identities_and_rebuilt_when_broken() {
    let Some(_artifacts) = artifacts_or_skip("templates") else {
        return;
    };
    let Some(bin) = cocoon_binary() else {
        return;
    };
    let _one = ONE_VM_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let scratch = Scratch::new("template");
    let template_dir = scratch.path("templates");
    let config = scratch.path("config.toml");
    std::fs::write(
        &config,
        format!("template_dir = \"{}\"\n", template_dir.display()),
    )
    .unwrap();
    let cocoon = Cocoon {
        bin,
        root: scratch.path("root"),
        config: Some(config),
    };
    let b = bundle(&scratch.path("bundle"), &["sh", "-c", IDENTITY]);
    assert!(templates(&cocoon).is_empty());
    let bad = cocoon.fails(&["template", "create", "--slots", "0"]);
    let slots = format!("1 to {} disk slots", cocoon_runtime::template::MAX_SLOTS);
    assert!(bad.contains(&slots), "{bad}");
    let missing = cocoon.fails(&["template", "rm", "0123456789abcdef"]);
    assert!(missing.contains("does not exist"), "{missing}");

    // Two first uses at once: one makes the template, the other waits for it; both are clones.
    let logs = [scratch.path("a.log"), scratch.path("b.log")];
    let outputs = std::thread::scope(|s| {
        let runs: Vec<_> = ["a", "b"]
            .iter()
            .zip(&logs)
            .map(|(id, log)| {
                let (cocoon, b) = (&cocoon, &b);
                s.spawn(move || run(cocoon, b, id, log, &[]))
            })
            .collect();
        runs.into_iter()
            .map(|r| r.join().unwrap())
            .collect::<Vec<_>>()
    });
    let a = assert_ran(&outputs[0], "a", &logs[0]);
    let b_lines = assert_ran(&outputs[1], "b", &logs[1]);
    let made: usize = logs
        .iter()
        .map(|l| log_of(l).matches("made a template").count())
        .sum();
    assert_eq!(made, 1, "the template is made once");
    for log in &logs {
        assert!(log_of(log).contains("vm restored"), "{}", log_of(log));
    }
    assert_eq!(a.len(), 4, "{a:?}");
    assert_eq!(b_lines.len(), 4, "{b_lines:?}");
    for (i, what) in ["urandom bytes", "boot_id", "uuid"].iter().enumerate() {
        assert_eq!(a[i].len(), if i == 0 { 32 } else { 36 }, "{what}: {a:?}");
        assert_ne!(a[i], b_lines[i], "two clones share their {what}");
    }
    // The spec's hostname, set in each clone (the template's guest had none of its own).
    assert_eq!((a[3].as_str(), b_lines[3].as_str()), ("cocoon", "cocoon"));
    let list = templates(&cocoon);
    assert_eq!(list.len(), 1, "{list:?}");
    let name = list[0]["name"].as_str().unwrap().to_owned();
    let created = list[0]["created"].clone();
    cocoon.ok(&["delete", "a"]);
    cocoon.ok(&["delete", "b"]);

    // A template that fails to load is removed, made again, and the container still runs.
    let state = template_dir.join(&name).join("vm/state.bin");
    std::fs::write(&state, b"not a snapshot").unwrap();
    let log = scratch.path("c.log");
    assert_ran(&run(&cocoon, &b, "c", &log, &[]), "c", &log);
    assert!(
        log_of(&log).contains("the template failed to load"),
        "{}",
        log_of(&log)
    );
    let list = templates(&cocoon);
    assert_eq!(list.len(), 1, "{list:?}");
    assert_eq!(list[0]["name"], name.as_str());
    assert_ne!(list[0]["created"], created, "made again");
    cocoon.ok(&["delete", "c"]);

    // Forced cold: booted, with the reason in the log.
    let log = scratch.path("d.log");
    assert_ran(&run(&cocoon, &b, "d", &log, &["--no-template"]), "d", &log);
    let text = log_of(&log);
    assert!(
        text.contains("booting the microVM cold: --no-template"),
        "{text}"
    );
    assert!(!text.contains("vm restored"), "{text}");
    cocoon.ok(&["delete", "d"]);

    // Removing them leaves the directory empty.
    cocoon.ok(&["template", "rm", "--all"]);
    assert!(templates(&cocoon).is_empty());
    let left: Vec<_> = std::fs::read_dir(&template_dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(left.is_empty(), "left in the template directory: {left:?}");
    assert!(cocoon.containers().is_empty(), "{:?}", cocoon.containers());
}
