//! What a container's sandbox is made of, settled by `create` before its monitor starts and
//! written to `launch.json` in the container's directory: the spec as the guest will see it,
//! the layer images, the host files shared with it, the VM's size and boot files.

use std::path::{Path, PathBuf};

use oci_spec::runtime::Spec;
use serde::{Deserialize, Serialize};

use crate::bundle::{Bundle, vm_size};
use crate::config::Config;
use crate::error::Error;
use crate::progress::GuestLimits;
use crate::sandbox::StartPlan;
use crate::shares::HostShare;
use crate::state::{ContainerDir, Record, process_start_time, rfc3339, write_atomically};
use crate::{hooks, images};

pub const LAUNCH_FILE: &str = "launch.json";

/// The disks a container's VM can have: its layers' images. The template for containers with
/// many layers has this many slots (every virtio device but the vsock's, the file server's
/// and one NIC's), and a cold-booted VM has room for as many.
pub const MAX_DISKS: usize = crate::template::MAX_SLOTS;

/// Refuses, at `create`, a container whose images would not fit the VM's disk slots: the VM
/// itself would only fail later, while it is being made.
fn check_disks(layers: usize) -> Result<(), Error> {
    if layers > MAX_DISKS {
        return Err(Error::TooManyLayers {
            layers,
            slots: MAX_DISKS,
        });
    }
    Ok(())
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Launch {
    pub spec: Spec,
    pub images: Vec<PathBuf>,
    /// The host files the spec bind-mounts, shared with the guest (see shares.rs); the spec's
    /// mounts name them where the guest sees them.
    #[serde(default)]
    pub shares: Vec<HostShare>,
    pub console_socket: Option<PathBuf>,
    pub cpus: u8,
    pub memory_mib: u64,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    /// How long waits on the guest go on without progress (the config's, at create).
    #[serde(default)]
    pub guest_limits: GuestLimits,
    /// The config's `seccomp` when the container was created.
    #[serde(default = "jailed")]
    pub seccomp: bool,
    /// From a template or cold, and why.
    pub start: StartPlan,
}

/// The annotation that, set to `false`, has a container's VM boot instead of being restored
/// from a template.
pub const TEMPLATE_ANNOTATION: &str = "io.cocoon.template";

fn jailed() -> bool {
    true
}

impl Launch {
    pub fn read(dir: &Path) -> Result<Launch, Error> {
        crate::state::read_json(&dir.join(LAUNCH_FILE))
    }

    /// Reads the record of the container whose VM this process is to run, and takes its jail
    /// policy for that VM.
    pub fn read_for_vm(dir: &Path) -> Result<Launch, Error> {
        let launch = Launch::read(dir)?;
        cocoon_vmm::jail::set_seccomp(launch.seccomp);
        Ok(launch)
    }

    fn write(&self, dir: &ContainerDir) -> Result<(), Error> {
        let json = serde_json::to_vec(self).map_err(|source| Error::Encode {
            what: "the launch record",
            source,
        })?;
        write_atomically(&dir.file(LAUNCH_FILE), &json)
    }

    /// Whether the container's process has a terminal.
    pub fn terminal(&self) -> bool {
        self.spec.process().as_ref().and_then(|p| p.terminal()) == Some(true)
    }
}

/// What `create` is asked for.
pub struct CreateRequest<'a> {
    pub root: &'a Path,
    pub id: &'a str,
    pub bundle: &'a Path,
    pub console_socket: Option<&'a Path>,
    /// `--no-template`: boot the VM even where a template could be restored.
    pub no_template: bool,
}

/// Everything before the monitor starts: bundle checked, directory made, images built,
/// `launch.json` written. On error nothing is left behind.
pub fn prepare(request: &CreateRequest) -> Result<(ContainerDir, Bundle), Error> {
    let config = Config::load()?;
    let bundle = Bundle::load(request.bundle)?;
    bundle.require_process()?;
    hooks::check(bundle.spec.hooks().as_ref())?;
    crate::network::check(&bundle.spec)?;
    if bundle.terminal() && request.console_socket.is_none() {
        return Err(Error::ConsoleSocketRequired);
    }
    let dir = ContainerDir::create(request.root, request.id)?;
    crate::phase::phase("bundle checked");
    match settle(&dir, &bundle, &config, request) {
        Ok(launch) => match launch.write(&dir) {
            Ok(()) => {
                crate::phase::phase("images ready");
                Ok((dir, bundle))
            }
            Err(e) => {
                let _ = dir.remove();
                Err(e)
            }
        },
        Err(e) => {
            let _ = dir.remove();
            Err(e)
        }
    }
}

fn settle(
    dir: &ContainerDir,
    bundle: &Bundle,
    config: &Config,
    request: &CreateRequest,
) -> Result<Launch, Error> {
    let console_socket = request.console_socket;
    // Counted before any image is built: too many is a quick error, not minutes of mkfs.
    let layer_count = images::image_count(&bundle.rootfs);
    check_disks(layer_count)?;
    let mut spec = bundle.spec.clone();
    let shares = crate::shares::plan(&mut spec)?;
    let layers = images::images_for(&bundle.rootfs, &config.layer_cache, &dir.path)?;
    // This container's layers are open by none yet, but were touched just now.
    match crate::layer_cache::collect_if_due(&config.layer_cache, config.layer_cache_max_age()) {
        Ok(Some(done)) if !done.removed.is_empty() => tracing::debug!(
            removed = done.removed.len(),
            bytes = done.removed_bytes,
            "layer cache collected"
        ),
        Ok(_) => {}
        Err(e) => tracing::warn!("collecting the layer cache: {e}"),
    }
    // Again: an empty upper layer may have gained its first file meanwhile.
    check_disks(layers.len())?;
    let (cpus, memory_mib) = vm_size(&bundle.spec, config);
    Ok(Launch {
        spec,
        images: layers.into_iter().map(|l| l.image).collect(),
        shares,
        console_socket: console_socket.map(|p| std::path::absolute(p).unwrap_or_else(|_| p.into())),
        cpus,
        memory_mib,
        kernel: config.kernel.clone(),
        initrd: config.initrd.clone(),
        guest_limits: config.guest_limits(),
        seccomp: config.seccomp,
        start: start_plan(&bundle.spec, config, request.no_template),
    })
}

/// From a template unless something says otherwise; the reason is kept for the monitor's log.
fn start_plan(spec: &Spec, config: &Config, no_template: bool) -> StartPlan {
    let annotation = spec
        .annotations()
        .as_ref()
        .and_then(|a| a.get(TEMPLATE_ANNOTATION));
    let reason = if !config.templates {
        Some("templates = false in the configuration".to_owned())
    } else if no_template {
        Some("--no-template".to_owned())
    } else {
        annotation
            .filter(|v| matches!(v.as_str(), "false" | "0" | "no" | "off"))
            .map(|value| format!("annotation {TEMPLATE_ANNOTATION}={value}"))
    };
    match reason {
        Some(reason) => StartPlan::Cold { reason },
        None => StartPlan::Template {
            dir: config.template_dir.clone(),
        },
    }
}

/// The record of a container whose process (monitor) is `pid`.
pub fn record(dir: &ContainerDir, bundle: &Bundle, pid: i32, started: bool) -> Record {
    Record {
        id: dir.id.clone(),
        bundle: bundle.path.clone(),
        rootfs: bundle.rootfs.clone(),
        pid,
        pid_start_time: process_start_time(pid).unwrap_or(0),
        created: rfc3339(std::time::SystemTime::now()),
        started,
        annotations: bundle
            .spec
            .annotations()
            .clone()
            .unwrap_or_default()
            .into_iter()
            .collect(),
        hooks: bundle.spec.hooks().clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(annotation: Option<&str>) -> Spec {
        let mut spec = Spec::default();
        if let Some(value) = annotation {
            spec.set_annotations(Some(
                [(TEMPLATE_ANNOTATION.to_owned(), value.to_owned())].into(),
            ));
        }
        spec
    }

    #[test]
    fn too_many_layers_are_refused_naming_both_numbers() {
        check_disks(MAX_DISKS).unwrap();
        let error = check_disks(MAX_DISKS + 1).unwrap_err().to_string();
        assert!(
            error.contains(&format!("{} disk images", MAX_DISKS + 1))
                && error.contains(&format!("{MAX_DISKS} disk slots")),
            "{error}"
        );
        // What the VMM itself would take: every disk with the vsock and virtio-fs devices
        // and one NIC.
        assert_eq!(
            MAX_DISKS + 3,
            cocoon_vmm::arch::x86_64::layout::VIRTIO_MAX_DEVICES
        );
    }

    #[test]
    fn templates_unless_config_flag_or_annotation_say_no() {
        let config = Config::default();
        assert_eq!(
            start_plan(&spec(None), &config, false),
            StartPlan::Template {
                dir: config.template_dir.clone()
            }
        );
        assert!(matches!(
            start_plan(&spec(Some("true")), &config, false),
            StartPlan::Template { .. }
        ));
        let reason = |plan| match plan {
            StartPlan::Cold { reason } => reason,
            other => panic!("{other:?}"),
        };
        assert_eq!(
            reason(start_plan(&spec(None), &config, true)),
            "--no-template"
        );
        assert_eq!(
            reason(start_plan(&spec(Some("false")), &config, false)),
            "annotation io.cocoon.template=false"
        );
        let off = Config {
            templates: false,
            ..Config::default()
        };
        assert!(reason(start_plan(&spec(None), &off, false)).contains("templates = false"));
    }
}
