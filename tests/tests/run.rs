//! Running modules to completion: output, arguments, environment, files, mounts, exit codes,
//! memory limits, and an image built by `kiln image build`.

use std::time::Duration;

use kiln_e2e::{image, kiln};

#[test]
fn hello_prints_greeting_and_exits_0() {
    let k = kiln();
    let c = k.container("hello");
    let out = c.run(&image("hello")).output();
    assert_eq!(out.code(), 0, "hello must exit 0:\n{out}");
    assert_eq!(
        out.stdout, "Hello from Kiln!\n",
        "unexpected stdout:\n{out}"
    );
    assert_eq!(out.stderr, "", "hello writes nothing to stderr:\n{out}");
}

#[test]
fn args_and_env_reach_the_guest() {
    let k = kiln();

    // The image's entrypoint: argv[0] is the module path as written in the image.
    let c = k.container("printargs-default");
    let out = c.run(&image("printargs")).env("FOO=bar").output();
    assert_eq!(out.code(), 0, "printargs must exit 0:\n{out}");
    let args: Vec<&str> = out
        .stdout
        .lines()
        .filter(|l| l.starts_with("arg["))
        .collect();
    assert_eq!(args, ["arg[0]=/printargs.wasm"], "argv:\n{out}");
    assert!(
        out.stdout.lines().any(|l| l == "env:FOO=bar"),
        "env:FOO=bar missing:\n{out}"
    );
    assert!(out.stdout.lines().any(|l| l == "cwd=/"), "cwd:\n{out}");

    // ctr's extra args replace the whole argv (entrypoint included), as with runc.
    let c = k.container("printargs-args");
    let out = c
        .run(&image("printargs"))
        .env("FOO=bar")
        .env("EMPTY=")
        .args(["/printargs.wasm", "a", "b c"])
        .output();
    assert_eq!(out.code(), 0, "printargs must exit 0:\n{out}");
    let args: Vec<&str> = out
        .stdout
        .lines()
        .filter(|l| l.starts_with("arg["))
        .collect();
    assert_eq!(
        args,
        ["arg[0]=/printargs.wasm", "arg[1]=a", "arg[2]=b c"],
        "argv:\n{out}"
    );
    let env: Vec<&str> = out
        .stdout
        .lines()
        .filter(|l| l.starts_with("env:"))
        .collect();
    assert!(env.contains(&"env:FOO=bar"), "env:FOO=bar missing:\n{out}");
    assert!(env.contains(&"env:EMPTY="), "env:EMPTY= missing:\n{out}");
    assert!(
        env.iter().any(|l| l.starts_with("env:PATH=")),
        "the default PATH from the spec is missing:\n{out}"
    );
}

#[test]
fn rootfs_is_readable_and_writable() {
    let k = kiln();

    let c = k.container("rootfs-ls");
    let out = c
        .run(&image("fileio"))
        .args(["/fileio.wasm", "ls", "/"])
        .output();
    assert_eq!(out.code(), 0, "ls / must succeed:\n{out}");
    assert!(
        out.stdout.lines().any(|l| l == "fileio.wasm"),
        "ls / does not list fileio.wasm:\n{out}"
    );

    let c = k.container("rootfs-read");
    let out = c
        .run(&image("fileio"))
        .args(["/fileio.wasm", "read", "/fileio.wasm"])
        .output();
    assert_eq!(
        out.code(),
        0,
        "reading the module itself must succeed:\n{out}"
    );
    let module = std::fs::read(k.wasm("fileio")).expect("read fileio.wasm");
    assert!(
        out.stdout.as_bytes().starts_with(b"\0asm"),
        "read /fileio.wasm did not print the module (expected the \\0asm magic):\n{out}"
    );
    // Lossy UTF-8 conversion changes invalid bytes, so compare lengths only loosely.
    assert!(
        out.stdout.len() >= module.len() / 2,
        "read /fileio.wasm printed {} bytes, the module has {}",
        out.stdout.len(),
        module.len()
    );

    let c = k.container("rootfs-write");
    let out = c
        .run(&image("fileio"))
        .args(["/fileio.wasm", "write", "/out.txt", "hello"])
        .output();
    assert_eq!(out.code(), 0, "writing to the rootfs must succeed:\n{out}");
    assert_eq!(out.stdout, "wrote /out.txt\n", "{out}");

    // Each container gets its own snapshot: the file written above is not in the image.
    let c = k.container("rootfs-isolated");
    let out = c
        .run(&image("fileio"))
        .args(["/fileio.wasm", "ls", "/"])
        .output();
    assert_eq!(out.code(), 0, "{out}");
    assert!(
        !out.stdout.lines().any(|l| l == "out.txt"),
        "a file written by another container is visible:\n{out}"
    );
}

#[test]
fn bind_mount_read_write() {
    let k = kiln();
    let host = tempfile::tempdir().expect("tempdir");
    std::fs::write(host.path().join("in.txt"), "content from the host\n").unwrap();

    let c = k.container("bind-rw-read");
    let out = c
        .run(&image("fileio"))
        .bind(host.path(), "/data", false)
        .args(["/fileio.wasm", "read", "/data/in.txt"])
        .output();
    assert_eq!(
        out.code(),
        0,
        "reading a bind-mounted file must work:\n{out}"
    );
    assert_eq!(out.stdout, "content from the host\n", "{out}");

    let c = k.container("bind-rw-write");
    let out = c
        .run(&image("fileio"))
        .bind(host.path(), "/data", false)
        .args(["/fileio.wasm", "write", "/data/out.txt", "hi"])
        .output();
    assert_eq!(
        out.code(),
        0,
        "writing through a rw bind mount must work:\n{out}"
    );
    assert_eq!(out.stdout, "wrote /data/out.txt\n", "{out}");
    let written = std::fs::read_to_string(host.path().join("out.txt"));
    assert_eq!(
        written.as_deref().ok(),
        Some("hi"),
        "the host file is not what the guest wrote ({written:?}):\n{out}"
    );
}

#[test]
fn bind_mount_read_only() {
    let k = kiln();
    let host = tempfile::tempdir().expect("tempdir");
    std::fs::write(host.path().join("in.txt"), "read-only content\n").unwrap();

    let c = k.container("bind-ro-write");
    let out = c
        .run(&image("fileio"))
        .bind(host.path(), "/data", true)
        .args(["/fileio.wasm", "write", "/data/out.txt", "hi"])
        .output();
    assert_eq!(
        out.code(),
        1,
        "writing through a ro bind mount must fail:\n{out}"
    );
    assert!(out.stderr.contains("write failed"), "{out}");
    assert!(
        !host.path().join("out.txt").exists(),
        "the guest created a file through a read-only mount:\n{out}"
    );

    let c = k.container("bind-ro-read");
    let out = c
        .run(&image("fileio"))
        .bind(host.path(), "/data", true)
        .args(["/fileio.wasm", "read", "/data/in.txt"])
        .output();
    assert_eq!(
        out.code(),
        0,
        "reading through a ro bind mount must work:\n{out}"
    );
    assert_eq!(out.stdout, "read-only content\n", "{out}");
}

#[test]
fn exit_codes_and_traps() {
    let k = kiln();
    for code in [0, 3] {
        let c = k.container("exitcode");
        let out = c
            .run(&image("exitcode"))
            .args(["/exitcode.wasm".to_string(), code.to_string()])
            .output();
        assert_eq!(out.code(), code, "exit status not propagated:\n{out}");
        assert_eq!(out.stdout, format!("exiting with {code}\n"), "{out}");
    }

    let c = k.container("trap");
    let out = c.run(&image("trap")).output();
    assert_eq!(out.code(), 134, "a trap must give exit status 134:\n{out}");
    assert!(
        out.stdout.contains("about to trap"),
        "output before the trap was lost:\n{out}"
    );
    assert!(out.stderr.contains("wasm trap"), "{out}");
    assert!(
        out.stderr.contains(&format!("kiln: container {}", c.id)),
        "the trap message must name the container:\n{out}"
    );
}

/// Parses `memory.grow failed at N MiB`.
fn failed_at(stdout: &str) -> Option<u64> {
    stdout.lines().find_map(|l| {
        l.strip_prefix("memory.grow failed at ")?
            .strip_suffix(" MiB")?
            .parse()
            .ok()
    })
}

#[test]
fn memory_limit_caps_linear_memory() {
    let k = kiln();
    let c = k.container("memgrow-limited");
    let out = c
        .run(&image("memgrow"))
        .memory_limit(64 << 20)
        .timeout(Duration::from_secs(60))
        .output();
    assert_eq!(
        out.code(),
        12,
        "memgrow under a 64 MiB limit must see memory.grow fail (exit 12), not be killed:\n{out}"
    );
    let at = failed_at(&out.stdout)
        .unwrap_or_else(|| panic!("no `memory.grow failed at N MiB` line:\n{out}"));
    assert!(
        (1..64).contains(&at),
        "memory.grow failed at {at} MiB; expected between 1 and 63 MiB under a 64 MiB limit:\n{out}"
    );

    let c = k.container("memgrow-unlimited");
    let out = c
        .run(&image("memgrow"))
        .args(["/memgrow.wasm", "100"])
        .timeout(Duration::from_secs(60))
        .output();
    assert_eq!(
        out.code(),
        0,
        "memgrow 100 without a limit must succeed:\n{out}"
    );
    assert!(out.stdout.contains("reached 100 MiB"), "{out}");
}

#[test]
fn kiln_image_build_round_trip() {
    let k = kiln();
    let dir = tempfile::tempdir().expect("tempdir");
    let tar = dir.path().join("roundtrip.tar");
    let mut cmd = std::process::Command::new(k.kiln_cli());
    cmd.args(["image", "build"])
        .arg(k.wasm("hello"))
        .args(["-t", "kiln-test/roundtrip:v1", "--platform", "wasip1/wasm"])
        .arg("-o")
        .arg(&tar);
    let out = kiln_e2e::process::run(cmd, Duration::from_secs(60));
    assert!(out.success(), "kiln image build failed:\n{out}");
    assert!(
        out.stdout
            .starts_with("docker.io/kiln-test/roundtrip:v1 sha256:"),
        "kiln image build must print `<reference> <digest>`:\n{out}"
    );

    let imported = k.import(&tar);
    assert!(imported.success(), "import failed:\n{imported}");
    let ls = k.ctr(&["images", "ls"]);
    let line = ls
        .stdout
        .lines()
        .find(|l| l.starts_with("docker.io/kiln-test/roundtrip:v1 "))
        .unwrap_or_else(|| panic!("the imported image is not listed:\n{ls}"));
    assert!(line.contains("wasip1/wasm"), "platform not kept: {line}");

    let c = k.container("roundtrip");
    let out = c.run("docker.io/kiln-test/roundtrip:v1").output();
    assert_eq!(out.code(), 0, "{out}");
    assert_eq!(out.stdout, "Hello from Kiln!\n", "{out}");
}
