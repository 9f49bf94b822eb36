//! README's commands run as shown on a fresh clone: every script it tells the reader
//! to run is there, executable (in git, so a clone gets it so) and has an
//! interpreter line; and bench/boot.py compares like with like, giving QEMU exactly
//! the kernel command line skiff gave the guest.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// The repository's scripts (`bench/...`, `scripts/...`) README runs: the first word of
/// each command in its shell blocks (commands split at `&&`, `||`, `;` and `|`), and
/// inline code that starts with one.
fn scripts_readme_runs() -> Vec<String> {
    let readme = std::fs::read_to_string(Path::new(ROOT).join("README.md")).expect("README.md");
    let is_script = |w: &str| w.starts_with("bench/") || w.starts_with("scripts/");
    let mut found = Vec::new();
    let mut in_sh = false;
    for line in readme.lines() {
        let trimmed = line.trim_start();
        if trimmed.starts_with("```") {
            in_sh = !in_sh && trimmed.trim_start_matches('`').trim() == "sh";
            continue;
        }
        if in_sh {
            let code = trimmed.split('#').next().unwrap_or("");
            for cmd in code.split(['&', '|', ';']) {
                // Leading VAR=value assignments are not the command.
                let word = cmd.split_whitespace().find(|w| !w.contains('='));
                if let Some(w) = word.filter(|w| is_script(w)) {
                    found.push(w.to_string());
                }
            }
        } else {
            for (i, span) in line.split('`').enumerate() {
                if i % 2 == 1
                    && let Some(w) = span.split_whitespace().find(|w| !w.contains('=')).filter(|w| is_script(w))
                {
                    found.push(w.to_string());
                }
            }
        }
    }
    found.sort();
    found.dedup();
    found
}

#[test]
fn every_script_readme_runs_is_executable_in_git() {
    let scripts = scripts_readme_runs();
    for expected in ["bench/boot.py", "bench/exits.py", "bench/reboot.py", "scripts/fetch-guest", "scripts/test"] {
        assert!(scripts.iter().any(|s| s == expected), "README no longer runs {expected}? found {scripts:?}");
    }
    // The mode git records is what a fresh clone gets.
    let git = Command::new("git").args(["ls-files", "-s", "--"]).args(&scripts).current_dir(ROOT).output();
    let index = git.ok().filter(|o| o.status.success()).map(|o| String::from_utf8_lossy(&o.stdout).into_owned());
    let mut wrong = Vec::new();
    for script in &scripts {
        let path = Path::new(ROOT).join(script);
        let Ok(meta) = std::fs::metadata(&path) else {
            wrong.push(format!("{script}: README runs it, but there is no such file"));
            continue;
        };
        if meta.permissions().mode() & 0o111 == 0 {
            wrong.push(format!("{script}: not executable here"));
        }
        if let Some(index) = &index {
            match index.lines().find(|l| l.ends_with(&format!("\t{script}"))) {
                Some(l) if l.starts_with("100755 ") => {}
                Some(l) => wrong.push(format!("{script}: git records mode {} (a clone cannot run it)", &l[..6])),
                None => wrong.push(format!("{script}: not in git")),
            }
        }
        let text = std::fs::read(&path).unwrap_or_default();
        if !text.starts_with(b"#!") {
            wrong.push(format!("{script}: no #! line"));
        }
    }
    assert!(wrong.is_empty(), "README's commands do not run as shown:\n{}", wrong.join("\n"));
}

/// What bench/boot.py builds for each VMM, asked of the script itself (python3).
fn boot_py(expr: &str, stderr_of_skiff: &str) -> Vec<String> {
    let program = format!(
        "import json, sys\nsys.path.insert(0, 'bench')\nimport boot\nstderr = sys.stdin.read()\nprint(json.dumps({expr}))\n"
    );
    let mut child = Command::new("python3")
        .args(["-c", &program])
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .current_dir(ROOT)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("python3 runs bench/boot.py");
    use std::io::Write;
    child.stdin.take().unwrap().write_all(stderr_of_skiff.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "bench/boot.py: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    // A JSON list of strings: good enough to split by hand for these arguments.
    let inner = text.trim().trim_start_matches('[').trim_end_matches(']');
    inner.split("\", \"").map(|s| s.trim_matches('"').replace("\\\"", "\"")).collect()
}

/// The value after `flag` in an argument list.
fn after<'a>(args: &'a [String], flag: &str) -> Option<&'a str> {
    args.iter().position(|a| a == flag).and_then(|i| args.get(i + 1)).map(String::as_str)
}

#[test]
fn bench_boot_gives_qemu_skiffs_kernel_command_line() {
    common::require_kvm();
    // skiff's final command line, as its --stats prints it (defaults and probe extras).
    let kernel = common::tiny_kernel("tiny");
    let out = Command::new(common::SKIFF)
        .args(["run", "--kernel"])
        .arg(&kernel)
        .args(["--boot", "pvh", "--stats"])
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run skiff");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let cmdline = stderr
        .lines()
        .find_map(|l| l.strip_prefix("kernel command line: "))
        .unwrap_or_else(|| panic!("skiff --stats names no kernel command line:\n{stderr}"))
        .to_string();
    assert!(cmdline.contains("console=ttyS0"), "{cmdline}");

    let parsed = boot_py("[boot.skiff_cmdline(stderr)]", &stderr);
    assert_eq!(parsed, std::slice::from_ref(&cmdline), "bench/boot.py reads skiff's command line");
    for guest in ["tiny", "debian"] {
        let qemu = boot_py(&format!("boot.qemu_cmd({guest:?}, boot.skiff_cmdline(stderr))"), &stderr);
        let skiff = boot_py(&format!("boot.skiff_cmd({guest:?})"), &stderr);
        assert_eq!(after(&qemu, "-append"), Some(cmdline.as_str()), "{guest}: QEMU's command line: {qemu:?}");
        // The same kernel (and initrd): what skiff boots by default is the guest dir's.
        let guest_dir = common::guest_dir();
        let (kernel, initrd) = match guest {
            "tiny" => (after(&skiff, "--kernel").map(String::from), None),
            _ => (
                Some(guest_dir.join("vmlinux").display().to_string()),
                Some(guest_dir.join("initrd.cpio").display().to_string()),
            ),
        };
        assert_eq!(after(&qemu, "-kernel").map(String::from), kernel, "{guest}: {qemu:?} vs {skiff:?}");
        assert_eq!(after(&qemu, "-initrd").map(String::from), initrd, "{guest}: {qemu:?}");
    }
}
