use std::os::unix::fs::symlink;

use super::*;

const WASM: &[u8] = b"\0asm\x01\0\0\0";
const COMPONENT: &[u8] = b"\0asm\x0d\0\x01\0";

const HOST: Host = Host {
    apparmor: false,
    selinux: false,
    cgroup_version: 1,
};

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
    let p = plan("c1", &spec(serde_json::json!({})), root.path(), &HOST).expect("plan");
    assert_eq!(p.module, ModuleSource::File(root.path().join("hello.wasm")));
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
    let p = plan("c1", &s, root.path(), &HOST).expect("plan");
    assert_eq!(p.entry_func, "run");
    assert_eq!(p.args, vec!["/hello.wasm", "x"]);
    let s = spec(serde_json::json!({"process": {"args": ["/hello.wasm#"]}}));
    assert!(matches!(
        plan("c1", &s, root.path(), &HOST),
        Err(PlanError::EmptyFunc(_))
    ));
}

#[test]
fn bare_name_is_found_through_path_then_cwd() {
    let root = rootfs();
    let s = spec(serde_json::json!({"process": {"args": ["tool.wasm"]}}));
    let p = plan("c1", &s, root.path(), &HOST).expect("plan");
    assert_eq!(
        p.module,
        ModuleSource::File(root.path().join("usr/bin/tool.wasm"))
    );
    assert_eq!(p.args[0], "tool.wasm");

    let s = spec(serde_json::json!({"process": {"args": ["local.wasm"], "cwd": "/app"}}));
    let p = plan("c1", &s, root.path(), &HOST).expect("plan");
    assert_eq!(
        p.module,
        ModuleSource::File(root.path().join("app/local.wasm"))
    );
    assert_eq!(p.cwd, "/app");
}

#[test]
fn missing_entrypoint_names_where_it_looked() {
    let root = rootfs();
    let s = spec(serde_json::json!({"process": {"args": ["nope.wasm"]}}));
    let e = plan("c1", &s, root.path(), &HOST).expect_err("missing");
    let msg = e.to_string();
    assert!(msg.contains("nope.wasm"), "{msg}");
    assert!(msg.contains("/usr/bin/nope.wasm"), "{msg}");
    assert!(matches!(e, PlanError::EntrypointNotFound { .. }));
}

#[test]
fn non_wasm_file_is_rejected_with_its_path() {
    let root = rootfs();
    let s = spec(serde_json::json!({"process": {"args": ["/script.sh"]}}));
    let e = plan("c1", &s, root.path(), &HOST).expect_err("not wasm");
    assert!(matches!(e, PlanError::NotWasm { ref path } if path == "/script.sh"));
    // An empty file is not Wasm either.
    std::fs::write(root.path().join("empty.wasm"), b"").expect("write");
    let s = spec(serde_json::json!({"process": {"args": ["/empty.wasm"]}}));
    assert!(matches!(
        plan("c1", &s, root.path(), &HOST),
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
    let p = plan("c1", &s, root.path(), &HOST).expect("plan");
    assert_eq!(p.module, ModuleSource::File(root.path().join("hello.wasm")));
    let s = spec(serde_json::json!({"process": {"args": ["/app/up.wasm"]}}));
    let p = plan("c1", &s, root.path(), &HOST).expect("plan");
    assert_eq!(p.module, ModuleSource::File(root.path().join("hello.wasm")));
    // A symlink loop is an error, not a hang.
    symlink("/loop", root.path().join("loop")).expect("symlink");
    assert!(resolve_in_root(root.path(), "/loop/x").is_err());
}

#[test]
fn a_symlink_to_a_name_that_is_not_utf8_is_refused() {
    // Found by fuzz/ (target plan): such a plan passed, then could not be encoded for the
    // zygote.
    use std::os::unix::ffi::OsStrExt;
    let root = rootfs();
    let odd = std::ffi::OsStr::from_bytes(b"d\xff");
    std::fs::create_dir(root.path().join(odd)).expect("mkdir");
    std::fs::write(root.path().join(odd).join("m.wasm"), WASM).expect("write");
    symlink(
        Path::new("/").join(odd).join("m.wasm"),
        root.path().join("odd.wasm"),
    )
    .expect("ln");
    symlink(odd, root.path().join("odd-dir")).expect("symlink");
    let s = spec(serde_json::json!({"process": {"args": ["/odd.wasm"]}}));
    let e = plan("c1", &s, root.path(), &HOST).expect_err("module path not UTF-8");
    assert!(
        matches!(&e, PlanError::Resolve { path, .. } if path == "/odd.wasm"),
        "{e}"
    );
    let s = spec(serde_json::json!({"process": {"cwd": "/odd-dir"}}));
    let e = plan("c1", &s, root.path(), &HOST).expect_err("cwd not UTF-8");
    assert!(
        matches!(&e, PlanError::Resolve { path, .. } if path == "/odd-dir"),
        "{e}"
    );
    // The same names through UTF-8 paths plan, and the plan reaches the worker intact.
    let s = spec(serde_json::json!({"process": {"args": ["/hello.wasm"], "cwd": "/app"}}));
    let p = plan("c1", &s, root.path(), &HOST).expect("plan");
    let json = serde_json::to_vec(&p).expect("encode");
    assert_eq!(serde_json::from_slice::<Plan>(&json).expect("decode"), p);
}

#[test]
fn terminal_is_refused() {
    let root = rootfs();
    let s = spec(serde_json::json!({"process": {"terminal": true}}));
    let e = plan("c1", &s, root.path(), &HOST).expect_err("terminal");
    assert!(e.to_string().contains("terminal"));
}

#[test]
fn a_relative_bind_source_is_refused() {
    // Found by fuzz/ (target plan): a relative source became a relative preopen, which the
    // worker opened from the shim's working directory (another container's bundle, once a
    // shim serves several) rather than from this container's bundle, as runc does.
    let root = rootfs();
    for source in [".", "rootfs", "./data"] {
        let s = spec(serde_json::json!({"mounts": [
            {"destination": "/data", "type": "bind", "source": source, "options": ["rbind"]},
        ]}));
        let e = plan("c1", &s, root.path(), &HOST).expect_err(source);
        assert!(
            matches!(&e, PlanError::Mount { destination, reason }
                if destination == "/data" && reason.contains("absolute")),
            "{source}: {e}"
        );
    }
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
    let p = plan("c1", &s, root.path(), &HOST).expect("plan");
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
    let e = plan("c1", &s, root.path(), &HOST).expect_err("missing source");
    assert!(e.to_string().contains("/data"), "{e}");
    assert!(e.to_string().contains("/nonexistent/kiln"), "{e}");

    let s = spec(serde_json::json!({"mounts": [
        {"destination": "/n", "type": "nfs", "source": "server:/x"},
    ]}));
    let e = plan("c1", &s, root.path(), &HOST).expect_err("nfs");
    assert!(e.to_string().contains("nfs"), "{e}");
}

#[test]
fn read_only_root_makes_the_root_preopen_read_only() {
    let root = rootfs();
    let s = spec(serde_json::json!({"root": {"path": "rootfs", "readonly": true}}));
    let p = plan("c1", &s, root.path(), &HOST).expect("plan");
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
            "namespaces": [{"type": "pid"}, {"type": "network", "path": "/run/netns/kiln-test-pod"}]
        }
    }));
    let p = plan("c1", &s, root.path(), &HOST).expect("plan");
    assert_eq!(
        p.env,
        vec![
            ("A".to_string(), "1".to_string()),
            ("B".to_string(), "x=y".to_string()),
            ("PATH".to_string(), "/bin".to_string())
        ]
    );
    assert_eq!(p.resources.memory_limit, Some(64 << 20));
    assert_eq!(p.resources.cpu_shares, Some(512));
    assert_eq!(p.resources.cpu_quota, Some(50000));
    assert_eq!(p.resources.cpu_period, Some(100000));
    assert_eq!(p.resources.pids_limit, Some(32));
    assert_eq!(p.cgroups_path, "/default/c1");
    assert_eq!(p.user.uid, 1000);
    assert_eq!(p.user.additional_gids, vec![5]);
    assert_eq!(
        p.namespaces,
        vec![Namespace {
            kind: "network".to_string(),
            action: NamespaceAction::Join("/run/netns/kiln-test-pod".into())
        }]
    );
}

fn ctr_default_spec() -> serde_json::Value {
    serde_json::json!({
        "process": {
            "capabilities": {
                "bounding": ["CAP_CHOWN", "CAP_KILL"],
                "effective": ["CAP_CHOWN"],
                "permitted": ["CAP_CHOWN", "CAP_KILL"]
            },
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 512}],
            "noNewPrivileges": true
        },
        "linux": {
            "resources": {"devices": [
                {"allow": false, "access": "rwm"},
                {"allow": true, "type": "c", "major": 1, "minor": 3, "access": "rwm"},
                {"allow": true, "type": "c", "major": 136, "access": "rwm"}
            ]},
            "namespaces": [{"type": "pid"}, {"type": "ipc"}, {"type": "uts"},
                           {"type": "mount"}, {"type": "network"}]
        }
    })
}

#[test]
fn capabilities_and_rlimits_come_from_the_spec() {
    let root = rootfs();
    let p = plan("c1", &spec(ctr_default_spec()), root.path(), &HOST).expect("plan");
    let c = &p.sandbox.capabilities;
    assert_eq!(c.bounding, ["CAP_CHOWN", "CAP_KILL"]);
    assert_eq!(c.effective, ["CAP_CHOWN"]);
    assert!(c.inheritable.is_empty() && c.ambient.is_empty());
    assert_eq!(
        p.sandbox.rlimits,
        vec![Rlimit {
            name: "RLIMIT_NOFILE".to_string(),
            resource: libc::RLIMIT_NOFILE,
            soft: 512,
            hard: 1024
        }]
    );
    assert_eq!(p.sandbox.seccomp, Seccomp::Default);
    let s = spec(serde_json::json!({"process": {"rlimits": [
        {"type": "RLIMIT_NOFILE", "hard": 10, "soft": 20}]}}));
    let e = plan("c1", &s, root.path(), &HOST).expect_err("soft above hard");
    assert!(e.to_string().contains("RLIMIT_NOFILE"), "{e}");
}

#[test]
fn device_rules_deny_by_default_and_allow_the_dev_nodes() {
    use kiln_cgroups::{DeviceKind, DeviceRule};
    let root = rootfs();
    let s = spec(ctr_default_spec());
    let p = plan("c1", &s, root.path(), &HOST).expect("plan");
    let rules = p.resources.devices.clone().expect("device rules");
    assert_eq!(rules[0], DeviceRule::deny_all());
    assert_eq!(rules[1], DeviceRule::deny_all(), "the spec's own deny-all");
    assert!(rules.contains(&DeviceRule::allow(DeviceKind::Char, 1, 3, "rwm")));
    // runc's default nodes are allowed too, as runc allows them.
    assert!(rules.contains(&DeviceRule::allow(DeviceKind::Char, 1, 9, "rwm")));
    assert!(
        !rules
            .iter()
            .any(|r| r.allow && r.major == Some(1) && r.minor == Some(11))
    );
    let nodes = p.sandbox.dev_nodes.clone().expect("a /dev of Kiln's");
    let names: Vec<&str> = nodes.iter().map(|n| n.path.as_str()).collect();
    assert_eq!(names, ["null", "zero", "full", "random", "urandom", "tty"]);
    assert!(p.sandbox.nodev, "image device nodes never open");

    // --device /dev/kmsg: a node in /dev and an allow rule.
    let mut with_dev = ctr_default_spec();
    with_dev["linux"]["devices"] = serde_json::json!([
        {"path": "/dev/kmsg", "type": "c", "major": 1, "minor": 11, "fileMode": 420, "uid": 0, "gid": 0}
    ]);
    let p = plan("c1", &spec(with_dev), root.path(), &HOST).expect("plan");
    let kmsg = p
        .sandbox
        .dev_nodes
        .expect("dev")
        .into_iter()
        .find(|n| n.path == "kmsg");
    assert_eq!(
        kmsg.map(|n| (n.major, n.minor, n.mode)),
        Some((1, 11, 0o644))
    );
    assert!(
        p.resources
            .devices
            .expect("rules")
            .contains(&DeviceRule::allow(DeviceKind::Char, 1, 11, "rwm"))
    );

    // A privileged container's rules allow everything: its mounts keep their device nodes.
    let mut privileged = ctr_default_spec();
    privileged["linux"]["resources"]["devices"] =
        serde_json::json!([{"allow": true, "access": "rwm"}]);
    let p = plan("c1", &spec(privileged), root.path(), &HOST).expect("plan");
    assert!(!p.sandbox.nodev);

    // Device nodes are made only below /dev.
    let mut outside = ctr_default_spec();
    outside["linux"]["devices"] =
        serde_json::json!([{"path": "/kmsg", "type": "c", "major": 1, "minor": 11}]);
    let e = plan("c1", &spec(outside), root.path(), &HOST).expect_err("outside /dev");
    assert!(e.to_string().contains("linux.devices"), "{e}");
}

#[test]
fn namespaces_created_joined_and_skipped_by_rule() {
    let root = rootfs();
    let p = plan("c1", &spec(ctr_default_spec()), root.path(), &HOST).expect("plan");
    let kinds: Vec<(&str, &NamespaceAction)> = p
        .namespaces
        .iter()
        .map(|n| (n.kind.as_str(), &n.action))
        .collect();
    // pid and mount are never created; network is not created for a core module.
    assert_eq!(
        kinds,
        [
            ("ipc", &NamespaceAction::Create),
            ("uts", &NamespaceAction::Create)
        ]
    );

    // A component gets its own network namespace.
    std::fs::write(root.path().join("hello.wasm"), COMPONENT).expect("write");
    let p = plan("c1", &spec(ctr_default_spec()), root.path(), &HOST).expect("plan");
    assert_eq!(p.module_kind, ModuleKind::Component);
    assert!(
        p.namespaces
            .iter()
            .any(|n| n.kind == "network" && n.action == NamespaceAction::Create)
    );

    // So does a core module whose spec sets a net.* sysctl.
    std::fs::write(root.path().join("hello.wasm"), WASM).expect("write");
    let mut s = ctr_default_spec();
    s["linux"]["sysctl"] = serde_json::json!({"net.ipv4.ip_unprivileged_port_start": "0"});
    let p = plan("c1", &spec(s), root.path(), &HOST).expect("plan");
    assert!(p.namespaces.iter().any(|n| n.kind == "network"));
    assert_eq!(
        p.sandbox.sysctls,
        [(
            "net.ipv4.ip_unprivileged_port_start".to_string(),
            "0".to_string()
        )]
    );

    // Joins come first, the user namespace before the others.
    let s = spec(serde_json::json!({"linux": {
        "namespaces": [{"type": "network", "path": "/run/netns/kiln-test-pod"}, {"type": "ipc"},
                       {"type": "user", "path": "/proc/1/ns/user"}]}}));
    let p = plan("c1", &s, root.path(), &HOST).expect("plan");
    let order: Vec<&str> = p.namespaces.iter().map(|n| n.kind.as_str()).collect();
    assert_eq!(order, ["user", "network", "ipc"]);

    let s = spec(serde_json::json!({"linux": {"namespaces": [{"type": "time"}]}}));
    assert!(plan("c1", &s, root.path(), &HOST).is_err());
}

#[test]
fn user_namespaces_need_mappings_and_mappings_need_a_user_namespace() {
    let root = rootfs();
    let s = spec(serde_json::json!({"linux": {
        "namespaces": [{"type": "user"}],
        "uidMappings": [{"containerID": 0, "hostID": 100000, "size": 65536}],
        "gidMappings": [{"containerID": 0, "hostID": 100000, "size": 65536}]}}));
    let p = plan("c1", &s, root.path(), &HOST).expect("plan");
    assert_eq!(p.namespaces[0].kind, "user");
    assert_eq!(
        p.sandbox.uid_mappings,
        [IdMap {
            container_id: 0,
            host_id: 100000,
            size: 65536
        }]
    );

    let s = spec(serde_json::json!({"linux": {"namespaces": [{"type": "user"}]}}));
    assert!(plan("c1", &s, root.path(), &HOST).is_err(), "no mappings");
    let s = spec(serde_json::json!({"linux": {
        "uidMappings": [{"containerID": 0, "hostID": 100000, "size": 1}]}}));
    let e = plan("c1", &s, root.path(), &HOST).expect_err("no user namespace");
    assert!(e.to_string().contains("uidMappings"), "{e}");
}

#[test]
fn sysctls_must_be_namespaced_and_in_the_containers_own_namespace() {
    let root = rootfs();
    let mut s = ctr_default_spec();
    s["linux"]["sysctl"] = serde_json::json!({"kernel.shmmax": "1000"});
    assert!(
        plan("c1", &spec(s.clone()), root.path(), &HOST).is_ok(),
        "ipc namespace created"
    );
    s["linux"]["namespaces"] = serde_json::json!([]);
    let e = plan("c1", &spec(s.clone()), root.path(), &HOST).expect_err("host ipc namespace");
    assert!(e.to_string().contains("ipc namespace"), "{e}");
    s["linux"]["sysctl"] = serde_json::json!({"vm.overcommit_memory": "1"});
    let e = plan("c1", &spec(s), root.path(), &HOST).expect_err("not namespaced");
    assert!(e.to_string().contains("vm.overcommit_memory"), "{e}");
}

#[test]
fn a_sysctl_key_names_one_file() {
    // Found by fuzz/ (target plan): "net." and "fs.mqueue." passed planning and named a
    // directory of /proc/sys, so the container failed only when the worker wrote it.
    let root = rootfs();
    for key in [
        "net.",
        "fs.mqueue.",
        "net..ipv4",
        "net.ipv4..x",
        "net.ipv4/conf",
    ] {
        let mut s = ctr_default_spec();
        s["linux"]["sysctl"] = serde_json::json!({ key: "1" });
        s["linux"]["namespaces"] = serde_json::json!([{"type": "ipc"}, {"type": "network"}]);
        let e = plan("c1", &spec(s), root.path(), &HOST).expect_err(key);
        assert!(e.to_string().contains("is not a sysctl name"), "{key}: {e}");
    }
    let mut s = ctr_default_spec();
    s["linux"]["sysctl"] =
        serde_json::json!({"net.ipv4.ip_forward": "1", "fs.mqueue.msg_max": "9"});
    s["linux"]["namespaces"] = serde_json::json!([{"type": "ipc"}, {"type": "network"}]);
    plan("c1", &spec(s), root.path(), &HOST).expect("plain keys");
}

#[test]
fn fields_kiln_cannot_honour_are_refused_by_name() {
    let root = rootfs();
    let cases = [
        (
            serde_json::json!({"hooks": {"prestart": [{"path": "/bin/true"}]}}),
            "hooks",
        ),
        (
            serde_json::json!({"linux": {"resources": {"blockIO": {"weight": 10}}}}),
            "blockIO",
        ),
        (
            serde_json::json!({"linux": {"resources": {"cpu": {"cpus": "0-1"}}}}),
            "linux.resources.cpu",
        ),
        (
            serde_json::json!({"linux": {"resources": {"memory": {"kernel": 1000}}}}),
            "memory.kernel",
        ),
        (
            serde_json::json!({"linux": {"resources": {"unified": {"memory.high": "100000"}}}}),
            "unified",
        ),
        (
            serde_json::json!({"linux": {"intelRdt": {"closID": "x"}}}),
            "intelRdt",
        ),
        (
            serde_json::json!({"linux": {"personality": {"domain": "LINUX32"}}}),
            "personality",
        ),
        (
            serde_json::json!({"process": {"apparmorProfile": "docker-default"}}),
            "apparmorProfile",
        ),
        (
            serde_json::json!({"process": {"scheduler": {"policy": "SCHED_OTHER"}}}),
            "scheduler",
        ),
        (serde_json::json!({"hostname": "web"}), "hostname"),
    ];
    for (json, field) in cases {
        let e = plan("c1", &spec(json.clone()), root.path(), &HOST)
            .expect_err(&format!("{json} must be refused"));
        assert!(e.to_string().contains(field), "{json}: {e}");
    }
    // Unified settings are applied on a v2 node; AppArmor where it is enabled.
    let v2 = Host {
        cgroup_version: 2,
        apparmor: true,
        ..HOST
    };
    let s = spec(serde_json::json!({
        "linux": {"resources": {"unified": {"memory.high": "100000"}}},
        "process": {"apparmorProfile": "kiln-test"}}));
    let p = plan("c1", &s, root.path(), &v2).expect("plan");
    assert_eq!(
        p.resources.unified,
        [("memory.high".to_string(), "100000".to_string())]
    );
    assert_eq!(p.sandbox.apparmor_profile.as_deref(), Some("kiln-test"));
}

#[test]
fn cwd_resolves_into_the_mount_that_holds_it() {
    let root = rootfs();
    let data = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir(data.path().join("sub")).expect("mkdir");
    let s = spec(serde_json::json!({
        "process": {"cwd": "/data/sub"},
        "mounts": [{"destination": "/data", "type": "bind", "source": data.path(), "options": ["rbind", "rw"]}]}));
    let p = plan("c1", &s, root.path(), &HOST).expect("plan");
    assert_eq!(p.cwd_in, (1, PathBuf::from("sub")));
    // A cwd that does not exist yet is planned (and created by the worker), inside the rootfs.
    let s = spec(serde_json::json!({"process": {"cwd": "/work/dir"}}));
    let p = plan("c1", &s, root.path(), &HOST).expect("plan");
    assert_eq!(p.cwd_in, (0, PathBuf::from("work/dir")));
    // A symlinked cwd stays inside its mount.
    symlink("/../../etc", root.path().join("up")).expect("symlink");
    let s = spec(serde_json::json!({"process": {"cwd": "/up"}}));
    let p = plan("c1", &s, root.path(), &HOST).expect("plan");
    assert_eq!(p.cwd_in, (0, PathBuf::from("etc")));
}

#[test]
fn bind_options_are_understood_or_refused() {
    let root = rootfs();
    let data = tempfile::tempdir().expect("tempdir");
    let m = |opts: serde_json::Value| {
        spec(serde_json::json!({"mounts": [
        {"destination": "/data", "type": "bind", "source": data.path(), "options": opts}]}))
    };
    let p = plan(
        "c1",
        &m(serde_json::json!([
            "rbind", "rprivate", "ro", "noexec", "nosuid", "nodev"
        ])),
        root.path(),
        &HOST,
    )
    .expect("plan");
    assert!(p.preopens[1].read_only && p.preopens[1].no_exec);
    let p = plan(
        "c1",
        &m(serde_json::json!(["rbind", "ro", "rw"])),
        root.path(),
        &HOST,
    )
    .expect("plan");
    assert!(!p.preopens[1].read_only, "the last of ro/rw wins");
    let e = plan(
        "c1",
        &m(serde_json::json!(["rbind", "idmap"])),
        root.path(),
        &HOST,
    )
    .expect_err("idmap");
    assert!(e.to_string().contains("idmap"), "{e}");
}

#[test]
fn the_module_kind_comes_from_the_version_bytes() {
    let root = rootfs();
    std::fs::write(root.path().join("odd.wasm"), b"\0asm\x02\0\0\0").expect("write");
    let s = spec(serde_json::json!({"process": {"args": ["/odd.wasm"]}}));
    let e = plan("c1", &s, root.path(), &HOST).expect_err("unknown version");
    assert!(matches!(e, PlanError::UnknownWasmVersion { .. }), "{e}");
    assert_eq!(
        ModuleKind::from_version([1, 0, 0, 0]),
        Some(ModuleKind::Core)
    );
    assert_eq!(
        ModuleKind::from_version([0x0d, 0, 1, 0]),
        Some(ModuleKind::Component)
    );
}

/// The README's table of spec fields names every field of [`fields::FIELDS`] with its
/// decision, so the documentation cannot fall behind the code.
#[test]
fn the_readme_lists_every_spec_field_decision() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md"))
        .expect("README.md");
    for field in fields::FIELDS {
        let row = format!("| `{}` | {} |", field.path, field.decision.word());
        assert!(
            readme.contains(&row),
            "README.md lacks the row starting {row:?}"
        );
    }
}

#[test]
fn joining_the_nodes_own_pid_or_network_namespace_counts_as_not_created() {
    let root = rootfs();
    let s = spec(serde_json::json!({"linux": {"namespaces": [
        {"type": "pid", "path": "/proc/self/ns/pid"},
        {"type": "network", "path": "/proc/self/ns/net"}]}}));
    let p = plan("c1", &s, root.path(), &HOST).expect("plan");
    assert!(p.namespaces.is_empty(), "{:?}", p.namespaces);
    assert_eq!(p.sandbox.skipped, ["pid", "network"]);
}

#[test]
fn a_component_joining_the_nodes_own_network_keeps_its_sockets() {
    // A host-network pod: the component is on the node's network, as asked; the guard that
    // denies socket() must not stand in for a namespace nobody wanted.
    let root = tempfile::tempdir().expect("tempdir");
    std::fs::write(root.path().join("c.wasm"), COMPONENT).expect("write");
    let s = spec(serde_json::json!({
        "process": {"args": ["/c.wasm"]},
        "linux": {"namespaces": [
            {"type": "pid", "path": "/proc/self/ns/pid"},
            {"type": "network", "path": "/proc/self/ns/net"}]}}));
    let p = plan("c1", &s, root.path(), &HOST).expect("plan");
    assert_eq!(p.module_kind, ModuleKind::Component);
    assert!(p.namespaces.is_empty(), "{:?}", p.namespaces);
    assert_eq!(p.sandbox.skipped, ["pid"]);
}

#[test]
fn a_pod_sandbox_has_no_module_and_keeps_its_namespaces() {
    let root = tempfile::tempdir().expect("tempdir");
    // The sandbox's image is a pause binary, not Wasm: it is not looked at.
    std::fs::write(root.path().join("pause"), b"\x7fELF").expect("write");
    let s = spec(serde_json::json!({
    "annotations": {"io.kubernetes.cri.container-type": "sandbox"},
    "process": {"args": ["/pause"]},
    "hostname": "pod-a",
    "linux": {
        "namespaces": [{"type": "pid"}, {"type": "ipc"}, {"type": "uts"},
                       {"type": "network", "path": "/run/netns/kiln-test-pod"}],
        "sysctl": {"net.ipv4.ip_unprivileged_port_start": "0"}
    }}));
    let p = plan("sb", &s, root.path(), &HOST).expect("plan");
    assert_eq!(p.role, Role::PodSandbox);
    assert!(p.preopens.is_empty() && p.sandbox.dev_nodes.is_none());
    let kinds: Vec<&str> = p.namespaces.iter().map(|n| n.kind.as_str()).collect();
    assert_eq!(kinds, ["network", "ipc", "uts"]);
    assert_eq!(p.sandbox.hostname.as_deref(), Some("pod-a"));
    assert_eq!(p.sandbox.skipped, ["pid"]);
}

#[test]
fn a_layer_module_is_planned_from_its_digest_and_first_bytes() {
    let root = tempfile::tempdir().expect("an empty rootfs, as a layer image has");
    let layer = |head: &[u8]| ImageLayer {
        digest: format!("sha256:{}", "a".repeat(64)),
        media_type: "application/wasm".to_string(),
        size: 1234,
        head: head.to_vec(),
    };
    let s = spec(serde_json::json!({"process": {"args": ["hello.wasm", "x"]}}));
    let p = plan_with_layer("c1", &s, root.path(), &HOST, &layer(COMPONENT)).expect("plan");
    assert_eq!(p.module_kind, ModuleKind::Component);
    assert!(matches!(p.module, ModuleSource::Layer { size: 1234, .. }));
    assert_eq!(p.args, ["hello.wasm", "x"]);
    assert_eq!(
        p.preopens[0].host,
        root.path(),
        "the (empty) rootfs is still the guest's /"
    );
    let e = plan_with_layer("c1", &s, root.path(), &HOST, &layer(b"#!/bin/sh\n"))
        .expect_err("not Wasm");
    assert!(
        e.to_string().contains("sha256:aaaa"),
        "the error names the layer: {e}"
    );
}
