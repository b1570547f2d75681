//! `lb takeover`: the new side of an upgrade (`super::upgrade` is the
//! protocol and the old side). It checks everything it can, says
//! `standby`, takes each slot the old side releases, then the services,
//! and serves like `lb run`.

use std::time::Instant;

use anyhow::{Context as _, bail};
use tokio::io::{AsyncBufReadExt, BufReader};

use super::{
    Reload,
    children::{Slot, Started, spawn_holder, spawn_worker},
    owner::Owner,
    state::{Procs, Supervisor},
    supervisor::serve,
    upgrade::{Step, UpgradeSpec, say},
};
use crate::{
    config::{Config, host::AlreadyChecked},
    dataplane::{Kind, holder::wire::VERSION},
    kernel::object::Objects,
    servers::command::Command,
};

/// `lb takeover`: the new side. Checks, says `standby`, takes each slot
/// the old side releases, then the services, and serves like `lb run`.
pub async fn take_over() -> anyhow::Result<()> {
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let first = lines.next_line().await.context("reading the spec")?.context("no spec on stdin")?;
    let prepared = prepare(&first);
    let (mut sup, objects) = match prepared {
        Ok(v) => v,
        Err(e) => {
            say(&Step::Failed { why: format!("{e:#}") });
            return Err(e);
        }
    };
    say(&Step::Standby { pid: std::process::id() });
    let mut procs = Procs::default();
    loop {
        let line = lines.next_line().await.context("reading from the old instance")?;
        let step: Step = serde_json::from_str(line.as_deref().context("the old instance went away")?)?;
        match step {
            Step::Release { index } if index < sup.slots.len() => {
                if std::env::var("LB_TEST_UPGRADE_FAIL_AFTER").is_ok_and(|v| v == index.to_string()) {
                    // Test hook: fail with the slot's connections taken.
                    let spec = super::holder::HolderSpec { takeover: true, ..sup.holders[index].0.clone() };
                    spawn_holder(&spec).await?;
                    bail!("LB_TEST_UPGRADE_FAIL_AFTER={index}: failing after taking slot {index} (a test setting)");
                }
                let spec = super::holder::HolderSpec { takeover: true, ..sup.holders[index].0.clone() };
                let (child, pid, took) = spawn_holder(&spec).await?;
                sup.holders[index].1 = Some(pid);
                procs.watch_holder(index, child);
                let Started { child, ready, io } = spawn_worker(sup.spec_for(index)).await?;
                sup.slots[index] = Slot { io: Some(io), pid: Some(ready.pid), started: Instant::now() };
                procs.watch_worker(index, child);
                log::info!("upgrade: slot {index} taken over with {took} connection(s)");
                say(&Step::Slot { index, took });
            }
            Step::Services => break,
            other => bail!("unexpected from the old instance: {other:?}"),
        }
    }
    let (mut owner, ctl) = Owner::adopted(&sup.cfg, sup.spec.kind, &sup.spec.listen, objects).await;
    // Under systemd (Type=notify, NotifyAccess=all) this process becomes the service's main one.
    let main = [sd_notify::NotifyState::MainPid(std::process::id()), sd_notify::NotifyState::Ready];
    if let Err(e) = sd_notify::notify(&main) {
        log::warn!("telling systemd the new main pid: {e}");
    }
    say(&Step::Ready { pid: std::process::id() });
    log::info!("upgrade: this instance (pid {}) serves", std::process::id());
    let r = serve(&mut sup, &mut procs, &mut owner, ctl).await;
    drop(owner);
    r
}

/// Everything checked before `standby`.
fn prepare(first: &str) -> anyhow::Result<(Supervisor, (Objects, crate::kernel::object::Meta))> {
    let spec: UpgradeSpec = serde_json::from_str(first).context("the upgrade spec is not valid")?;
    if spec.version != VERSION {
        bail!("the running instance's holders speak version {}, this binary {VERSION}", spec.version);
    }
    let file = spec.config_file.display().to_string();
    let cfg = Config::parse_on(&AlreadyChecked, &file, &spec.config_text, &spec.overrides)?;
    if cfg.guard.is_some() {
        bail!("[guard] is not carried over by an upgrade yet");
    }
    if cfg.frontends.len() != spec.listen.len() {
        bail!("{} listen addresses for {} frontends", spec.listen.len(), cfg.frontends.len());
    }
    // The maps on disk say what they are: the metadata records the layout
    // of the binary that made them. Checked before this binary's programs
    // are loaded on them.
    let ours = super::adopt::our_layout();
    let theirs = crate::kernel::object::Meta::read(&cfg.runtime_dir, &cfg.pin_path).map(|m| m.layout);
    if let Some(theirs) = theirs.filter(|t| *t != ours) {
        bail!("the running instance's maps are laid out differently (theirs: {theirs:?}; this binary: {ours:?})");
    }
    let (objects, meta) = Objects::adopt(&cfg.runtime_dir, &cfg.pin_path)
        .map_err(|e| anyhow::anyhow!("the running instance's pins: {e}"))?;
    let kind = if meta.dataplane == "kernel" { Kind::Kernel } else { Kind::Userspace };
    // The maps keep their capacities: maxconn keeps to them.
    let cap = super::adopt::on_pinned_maps(&cfg, kind == Kind::Kernel)
        .map_err(|why| anyhow::anyhow!("the running instance's maps cannot hold this configuration: {why}"))?;
    let reload = Reload { path: spec.config_file.clone(), overrides: spec.overrides };
    let (cfg, reload) = super::adopt::capped(cfg, reload, &spec.config_text, cap)?;
    let mut sup = Supervisor::new(cfg, reload, spec.config_text, kind, true, spec.listen);
    for c in &spec.replay {
        if let Err(e) = sup.model.apply(c) {
            log::warn!("replaying {c:?}: {e}");
        }
        if !matches!(c, Command::ServerHealth { .. }) {
            sup.replay.push(c.clone());
        }
    }
    Ok((sup, (objects, meta)))
}
