use std::os::unix::fs::symlink;

use super::*;

const WASM: &[u8] = b"\0asm\x01\0\0\0";

fn spec(json: serde_json::Value) -> Spec {
    let mut base = serde_json::json!({
        "ociVersion": "1.0.2",
        "process": { "args": ["/hello.wasm"], "cwd": "/", "user": {"uid": 0, "gid": 0},
                     "env": ["PATH=/usr/bin:/bin"] },
        "root": { "path": "rootfs" },
        "linux": {}
    });
    merge(&mut base, json);
    serde_json::from_value(base).expect("valid spec")
}

fn merge(a: &mut serde_json::Value, b: serde_json::Value) {
    match (a, b) {
        (serde_json::Value::Object(a), serde_json::Value::Object(b)) => {
            for (k, v) in b {
                merge(a.entry(k).or_insert(serde_json::Value::Null), v);
            }
        }
        (a, b) => *a = b,
    }
}

fn rootfs() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("hello.wasm"), WASM).expect("write");
    std::fs::create_dir_all(dir.path().join("usr/bin")).expect("mkdir");
    std::fs::write(dir.path().join("usr/bin/tool.wasm"), WASM).expect("write");
    std::fs::create_dir_all(dir.path().join("app")).expect("mkdir");
    std::fs::write(dir.path().join("app/local.wasm"), WASM).expect("write");
    std::fs::write(dir.path().join("script.sh"), b"#!/bin/sh\necho hi\n").expect("write");
    dir
}

#[test]
fn absolute_entrypoint_with_default_func() {
    let root = rootfs();
    let p = plan("c1", &spec(serde_json::json!({})), root.path()).expect("plan");
    assert_eq!(p.module_path, root.path().join("hello.wasm"));
    assert_eq!(p.entry_func, "_start");
    assert_eq!(p.args, vec!["/hello.wasm"]);
    assert_eq!(p.preopens[0].guest, "/");
    assert_eq!(p.preopens[0].host, root.path());
    assert!(!p.preopens[0].read_only);
}

#[test]
fn func_suffix_is_split_off_argv0() {
    let root = rootfs();
    let s = spec(serde_json::json!({"process": {"args": ["/hello.wasm#run", "x"]}}));
    let p = plan("c1", &s, root.path()).expect("plan");
    assert_eq!(p.entry_func, "run");
    assert_eq!(p.args, vec!["/hello.wasm", "x"]);
    let s = spec(serde_json::json!({"process": {"args": ["/hello.wasm#"]}}));
    assert!(matches!(
        plan("c1", &s, root.path()),
        Err(PlanError::EmptyFunc(_))
    ));
}

#[test]
fn bare_name_is_found_through_path_then_cwd() {
    let root = rootfs();
    let s = spec(serde_json::json!({"process": {"args": ["tool.wasm"]}}));
    let p = plan("c1", &s, root.path()).expect("plan");
    assert_eq!(p.module_path, root.path().join("usr/bin/tool.wasm"));
    assert_eq!(p.args[0], "tool.wasm");

    let s = spec(serde_json::json!({"process": {"args": ["local.wasm"], "cwd": "/app"}}));
    let p = plan("c1", &s, root.path()).expect("plan");
    assert_eq!(p.module_path, root.path().join("app/local.wasm"));
    assert_eq!(p.cwd, "/app");
}

#[test]
fn missing_entrypoint_names_where_it_looked() {
    let root = rootfs();
    let s = spec(serde_json::json!({"process": {"args": ["nope.wasm"]}}));
    let e = plan("c1", &s, root.path()).expect_err("missing");
    let msg = e.to_string();
    assert!(msg.contains("nope.wasm"), "{msg}");
    assert!(msg.contains("/usr/bin/nope.wasm"), "{msg}");
    assert!(matches!(e, PlanError::EntrypointNotFound { .. }));
}

#[test]
fn non_wasm_file_is_rejected_with_its_path() {
    let root = rootfs();
    let s = spec(serde_json::json!({"process": {"args": ["/script.sh"]}}));
    let e = plan("c1", &s, root.path()).expect_err("not wasm");
    assert!(matches!(e, PlanError::NotWasm { ref path } if path == "/script.sh"));
    // An empty file is not Wasm either.
    std::fs::write(root.path().join("empty.wasm"), b"").expect("write");
    let s = spec(serde_json::json!({"process": {"args": ["/empty.wasm"]}}));
    assert!(matches!(
        plan("c1", &s, root.path()),
        Err(PlanError::NotWasm { .. })
    ));
}

#[test]
fn absolute_symlinks_stay_inside_the_rootfs() {
    let root = rootfs();
    // On the host /hello.wasm does not exist; inside the rootfs it does.
    symlink("/hello.wasm", root.path().join("link.wasm")).expect("symlink");
    symlink("../../../../../hello.wasm", root.path().join("app/up.wasm")).expect("symlink");
    let s = spec(serde_json::json!({"process": {"args": ["/link.wasm"]}}));
    let p = plan("c1", &s, root.path()).expect("plan");
    assert_eq!(p.module_path, root.path().join("hello.wasm"));
    let s = spec(serde_json::json!({"process": {"args": ["/app/up.wasm"]}}));
    let p = plan("c1", &s, root.path()).expect("plan");
    assert_eq!(p.module_path, root.path().join("hello.wasm"));
    // A symlink loop is an error, not a hang.
    symlink("/loop", root.path().join("loop")).expect("symlink");
    assert!(resolve_in_root(root.path(), "/loop/x").is_err());
}

#[test]
fn terminal_is_refused() {
    let root = rootfs();
    let s = spec(serde_json::json!({"process": {"terminal": true}}));
    let e = plan("c1", &s, root.path()).expect_err("terminal");
    assert!(e.to_string().contains("terminal"));
}

#[test]
fn mounts_become_preopens_and_linux_mounts_are_skipped() {
    let root = rootfs();
    let data = tempfile::tempdir().expect("tempdir");
    let conf = tempfile::tempdir().expect("tempdir");
    let file = data.path().join("hosts");
    std::fs::write(&file, b"127.0.0.1 localhost\n").expect("write");
    let s = spec(serde_json::json!({"mounts": [
        {"destination": "/proc", "type": "proc", "source": "proc"},
        {"destination": "/dev", "type": "tmpfs", "source": "tmpfs"},
        {"destination": "/dev/pts", "type": "devpts", "source": "devpts"},
        {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue"},
        {"destination": "/sys", "type": "sysfs", "source": "sysfs"},
        {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup"},
        {"destination": "/data", "type": "bind", "source": data.path(), "options": ["rbind", "rw"]},
        {"destination": "/conf", "source": conf.path(), "options": ["rbind", "ro"]},
        {"destination": "/etc/hosts", "type": "bind", "source": file, "options": ["rbind", "ro"]},
    ]}));
    let p = plan("c1", &s, root.path()).expect("plan");
    assert_eq!(p.preopens.len(), 3, "{:?}", p.preopens);
    assert_eq!(p.preopens[1].guest, "/data");
    assert_eq!(p.preopens[1].host, data.path());
    assert!(!p.preopens[1].read_only);
    assert_eq!(p.preopens[2].guest, "/conf");
    assert!(p.preopens[2].read_only);
}

#[test]
fn impossible_mounts_are_errors() {
    let root = rootfs();
    let s = spec(serde_json::json!({"mounts": [
        {"destination": "/data", "type": "bind", "source": "/nonexistent/kiln", "options": ["rbind"]},
    ]}));
    let e = plan("c1", &s, root.path()).expect_err("missing source");
    assert!(e.to_string().contains("/data"), "{e}");
    assert!(e.to_string().contains("/nonexistent/kiln"), "{e}");

    let s = spec(serde_json::json!({"mounts": [
        {"destination": "/n", "type": "nfs", "source": "server:/x"},
    ]}));
    let e = plan("c1", &s, root.path()).expect_err("nfs");
    assert!(e.to_string().contains("nfs"), "{e}");
}

#[test]
fn read_only_root_makes_the_root_preopen_read_only() {
    let root = rootfs();
    let s = spec(serde_json::json!({"root": {"path": "rootfs", "readonly": true}}));
    let p = plan("c1", &s, root.path()).expect("plan");
    assert!(p.preopens[0].read_only);
}

#[test]
fn limits_env_user_and_namespaces_come_from_the_spec() {
    let root = rootfs();
    let s = spec(serde_json::json!({
        "process": {"env": ["A=1", "B=x=y", "PATH=/bin"], "user": {"uid": 1000, "gid": 100, "additionalGids": [5]}},
        "linux": {
            "cgroupsPath": "/default/c1",
            "resources": {"memory": {"limit": 67108864}, "cpu": {"shares": 512, "quota": 50000, "period": 100000}, "pids": {"limit": 32}},
            "namespaces": [{"type": "pid"}, {"type": "network", "path": "/proc/1/ns/net"}]
        }
    }));
    let p = plan("c1", &s, root.path()).expect("plan");
    assert_eq!(
        p.env,
        vec![
            ("A".to_string(), "1".to_string()),
            ("B".to_string(), "x=y".to_string()),
            ("PATH".to_string(), "/bin".to_string())
        ]
    );
    assert_eq!(p.limits.memory, Some(64 << 20));
    assert_eq!(p.limits.cpu_shares, Some(512));
    assert_eq!(p.limits.cpu_quota, Some(50000));
    assert_eq!(p.limits.cpu_period, Some(100000));
    assert_eq!(p.limits.pids, Some(32));
    assert_eq!(p.cgroups_path, "/default/c1");
    assert_eq!(p.user.uid, 1000);
    assert_eq!(p.user.additional_gids, vec![5]);
    assert_eq!(
        p.namespaces,
        vec![NamespaceJoin {
            kind: "network".to_string(),
            path: "/proc/1/ns/net".into()
        }]
    );
}
