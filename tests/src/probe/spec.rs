//! The container's OCI runtime spec: `ctr oci spec`'s template, completed the way `ctr run`
//! completes it (containerd 1.6's `WithImageConfig`, `WithDefaultUnixDevices`, the default
//! `--cpu-shares 1024`), so runc and Kiln get the same config.json as under `ctr run`.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, bail, ensure};
use serde_json::{Map, Value, json};

use super::image::ImageConfig;

/// containerd's default when neither the template nor the image sets an environment.
pub const DEFAULT_PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The device cgroup rules `ctr run` adds (containerd's `WithDefaultUnixDevices`): null, zero,
/// full, tty, random, urandom, console, pts and ptmx. `None` is any minor.
const DEFAULT_DEVICES: &[(i64, Option<i64>)] = &[
    (1, Some(3)),
    (1, Some(8)),
    (1, Some(7)),
    (5, Some(0)),
    (1, Some(5)),
    (1, Some(9)),
    (5, Some(1)),
    (136, None),
    (5, Some(2)),
];

/// `ctr run`'s `--cpu-shares` default.
const CPU_SHARES: u64 = 1024;

/// The template: FILE, or what `ctr oci spec` prints (ctr from PATH).
pub fn template(file: Option<&Path>) -> Result<Value> {
    let (text, source) = match file {
        Some(f) => (
            std::fs::read(f).with_context(|| format!("read the spec template {}", f.display()))?,
            f.display().to_string(),
        ),
        None => {
            let out = Command::new("ctr")
                .args(["oci", "spec"])
                .output()
                .context("run `ctr oci spec` for the spec template (or give --spec FILE)")?;
            ensure!(
                out.status.success(),
                "`ctr oci spec` failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
            (out.stdout, "`ctr oci spec`".to_string())
        }
    };
    let v: Value =
        serde_json::from_slice(&text).with_context(|| format!("{source} is not JSON"))?;
    ensure!(v.is_object(), "{source} is not a JSON object");
    Ok(v)
}

/// The spec every round shares: the template with the image's process settings (or `args`).
pub fn base(template: &Value, cfg: &ImageConfig, args: Option<&[String]>) -> Result<Value> {
    let mut spec = template.clone();
    let root = spec.as_object_mut().context("the spec is not an object")?;

    let process = object(root, "process")?;
    let argv: Vec<String> = match args {
        Some(a) => a.to_vec(),
        None => cfg.entrypoint.iter().chain(&cfg.cmd).cloned().collect(),
    };
    ensure!(
        !argv.is_empty(),
        "the image has neither Entrypoint nor Cmd: give the process's arguments after --"
    );
    process.insert("args".into(), json!(argv));

    let template_env = strings(process.get("env")).context("process.env of the template")?;
    let defaults = if template_env.is_empty() {
        vec![DEFAULT_PATH.to_string()]
    } else {
        template_env
    };
    process.insert("env".into(), json!(merge_env(&defaults, &cfg.env)));

    let cwd = if cfg.working_dir.is_empty() {
        "/"
    } else {
        cfg.working_dir.as_str()
    };
    process.insert("cwd".into(), json!(cwd));

    let user = object(process, "user")?;
    if !cfg.user.is_empty() {
        let (uid, gid) = numeric_user(&cfg.user)?;
        user.insert("uid".into(), json!(uid));
        user.insert("gid".into(), json!(gid));
    }
    if !user.contains_key("additionalGids") {
        // `ctr run` lists the primary group (from the image's /etc/group, else the gid).
        let gid = user.get("gid").cloned().unwrap_or(json!(0));
        user.insert("additionalGids".into(), json!([gid]));
    }

    object(root, "root")?.insert("path".into(), json!("rootfs"));

    let resources = object(object(root, "linux")?, "resources")?;
    let devices = resources
        .entry("devices")
        .or_insert_with(|| json!([]))
        .as_array_mut()
        .context("linux.resources.devices of the template is not a list")?;
    for &(major, minor) in DEFAULT_DEVICES {
        let mut rule = json!({"allow": true, "type": "c", "major": major, "access": "rwm"});
        if let (Some(m), Some(r)) = (minor, rule.as_object_mut()) {
            r.insert("minor".into(), json!(m));
        }
        if !devices.contains(&rule) {
            devices.push(rule);
        }
    }
    object(resources, "cpu")?
        .entry("shares")
        .or_insert_with(|| json!(CPU_SHARES));
    Ok(spec)
}

/// The spec of container `id`, serialized: the cgroup is per container, `/NS/ID` as with ctr.
pub fn for_container(base: &Value, namespace: &str, id: &str) -> Result<Vec<u8>> {
    let mut spec = base.clone();
    let root = spec.as_object_mut().context("the spec is not an object")?;
    object(root, "linux")?.insert("cgroupsPath".into(), json!(format!("/{namespace}/{id}")));
    serde_json::to_vec(&spec).context("serialize the spec")
}

/// `KEY=VALUE` lists: each entry of `over` replaces the entry of `base` with the same key, or
/// is appended.
pub fn merge_env(base: &[String], over: &[String]) -> Vec<String> {
    let key = |e: &str| e.split_once('=').map_or(e, |(k, _)| k).to_string();
    let mut out = base.to_vec();
    for e in over {
        let k = key(e);
        match out.iter_mut().find(|x| key(x) == k) {
            Some(slot) => *slot = e.clone(),
            None => out.push(e.clone()),
        }
    }
    out
}

/// An image's `User` as numbers. Names would need the image's /etc/passwd, which the probe
/// does not read.
fn numeric_user(user: &str) -> Result<(u32, u32)> {
    let (u, g) = user.split_once(':').unwrap_or((user, "0"));
    match (u.parse::<u32>(), g.parse::<u32>()) {
        (Ok(u), Ok(g)) => Ok((u, g)),
        _ => bail!("the image's User '{user}' is not uid[:gid]; kiln-probe takes numbers only"),
    }
}

fn object<'a>(parent: &'a mut Map<String, Value>, key: &str) -> Result<&'a mut Map<String, Value>> {
    parent
        .entry(key)
        .or_insert_with(|| json!({}))
        .as_object_mut()
        .with_context(|| format!("'{key}' in the spec is not an object"))
}

fn strings(v: Option<&Value>) -> Result<Vec<String>> {
    match v {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(a)) => a
            .iter()
            .map(|s| s.as_str().map(str::to_string).context("not a string"))
            .collect(),
        Some(other) => bail!("expected a list of strings, found {other}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What containerd 1.6's `ctr oci spec` prints, abridged.
    fn template() -> Value {
        json!({
            "ociVersion": "1.0.2-dev",
            "process": {"user": {"uid": 0, "gid": 0}, "cwd": "/", "noNewPrivileges": true},
            "root": {"path": "rootfs"},
            "linux": {"resources": {"devices": [{"allow": false, "access": "rwm"}]},
                      "cgroupsPath": "/default"}
        })
    }

    fn hello() -> ImageConfig {
        ImageConfig {
            entrypoint: vec!["/hello.wasm".into()],
            ..ImageConfig::default()
        }
    }

    #[test]
    fn like_ctr_run() {
        let spec = base(&template(), &hello(), None).expect("spec");
        let p = &spec["process"];
        assert_eq!(p["args"], json!(["/hello.wasm"]));
        assert_eq!(p["env"], json!([DEFAULT_PATH]));
        assert_eq!(p["cwd"], json!("/"));
        assert_eq!(
            p["user"],
            json!({"uid": 0, "gid": 0, "additionalGids": [0]})
        );
        assert_eq!(spec["root"]["path"], json!("rootfs"));
        let devices = spec["linux"]["resources"]["devices"]
            .as_array()
            .expect("devices");
        // The template's deny-all first, then the allow rules, as in ctr run's config.json.
        assert_eq!(devices.len(), 1 + DEFAULT_DEVICES.len());
        assert_eq!(devices[0]["allow"], json!(false));
        assert_eq!(
            devices[8],
            json!({"allow": true, "type": "c", "major": 136, "access": "rwm"})
        );
        assert_eq!(spec["linux"]["resources"]["cpu"]["shares"], json!(1024));

        // Applying it twice (a template that already has the rules) adds nothing.
        let again = base(&spec, &hello(), None).expect("again");
        assert_eq!(
            again["linux"]["resources"]["devices"],
            spec["linux"]["resources"]["devices"]
        );

        let bytes = for_container(&spec, "bench", "probe-kiln-1").expect("json");
        let v: Value = serde_json::from_slice(&bytes).expect("parse");
        assert_eq!(v["linux"]["cgroupsPath"], json!("/bench/probe-kiln-1"));
    }

    #[test]
    fn image_settings_and_args() {
        let cfg = ImageConfig {
            entrypoint: vec!["/bin/sh".into(), "-c".into()],
            cmd: vec!["echo default".into()],
            env: vec!["PATH=/bin".into(), "A=1".into()],
            working_dir: "/work".into(),
            user: "1000:100".into(),
        };
        let spec = base(&template(), &cfg, None).expect("spec");
        assert_eq!(
            spec["process"]["args"],
            json!(["/bin/sh", "-c", "echo default"])
        );
        assert_eq!(spec["process"]["env"], json!(["PATH=/bin", "A=1"]));
        assert_eq!(spec["process"]["cwd"], json!("/work"));
        assert_eq!(
            spec["process"]["user"],
            json!({"uid": 1000, "gid": 100, "additionalGids": [100]})
        );

        let args = ["echo".to_string(), "hi".to_string()];
        let spec = base(&template(), &cfg, Some(&args)).expect("spec");
        assert_eq!(spec["process"]["args"], json!(["echo", "hi"]));

        let named = ImageConfig {
            user: "nobody".into(),
            ..hello()
        };
        assert!(base(&template(), &named, None).is_err());
        assert!(base(&template(), &ImageConfig::default(), None).is_err());
        assert!(base(&json!({"process": []}), &hello(), None).is_err());
    }

    #[test]
    fn env_merging() {
        let base = vec![DEFAULT_PATH.to_string(), "TERM=xterm".to_string()];
        let over = vec![
            "PATH=/x".to_string(),
            "B=2".to_string(),
            "EMPTY".to_string(),
        ];
        assert_eq!(
            merge_env(&base, &over),
            vec!["PATH=/x", "TERM=xterm", "B=2", "EMPTY"]
        );
    }
}
