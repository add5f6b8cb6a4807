//! The controller: the control socket's handler. It registers applications, creates their
//! channels and hands each to the least loaded shard, and when an application goes away has
//! its shard close everything it owned.

use crate::shard::{ChannelSlot, ShardCmd};
use hashbrown::HashMap;
use machnet::ctrl::{AppId, ChannelGrant, CtrlHandler, PeerCred};
use machnet::engine::EngineChannel;
use machnet::layout::ChannelConfig;
use machnet::ops::Status;
use machnet_runtime::idle::Waker;
use std::sync::mpsc::SyncSender;

/// The controller's handle on one shard.
pub struct ShardLink {
    /// Commands.
    pub cmds: SyncSender<ShardCmd>,
    /// Wakes the shard after a command.
    pub waker: Waker,
    /// Channels assigned.
    pub channels: usize,
}

struct App {
    cred: PeerCred,
    channels: Vec<(u64, usize)>,
}

/// Serves the control protocol for the daemon.
pub struct Controller {
    shards: Vec<ShardLink>,
    apps: HashMap<AppId, App>,
    channel_cfg: ChannelConfig,
    max_channels: usize,
    next_channel: u64,
    hugepages: bool,
}

impl Controller {
    /// A controller for `shards`, creating channels of `channel_cfg`, at most `max_channels`.
    pub fn new(shards: Vec<ShardLink>, channel_cfg: ChannelConfig, max_channels: usize) -> Self {
        Controller { shards, apps: HashMap::new(), channel_cfg, max_channels, next_channel: 1, hugepages: true }
    }

    /// Channels served.
    pub fn channel_count(&self) -> usize {
        self.shards.iter().map(|s| s.channels).sum()
    }

    /// Registered applications.
    pub fn app_count(&self) -> usize {
        self.apps.len()
    }

    fn send(&mut self, shard: usize, cmd: ShardCmd) -> Result<(), Status> {
        let link = &self.shards[shard];
        link.cmds.send(cmd).map_err(|_| Status::Internal)?;
        link.waker.wake();
        Ok(())
    }

    /// Tells every shard to reset its flows and stop.
    pub fn shutdown(&mut self) {
        for i in 0..self.shards.len() {
            let _ = self.send(i, ShardCmd::Shutdown);
        }
    }
}

impl CtrlHandler for Controller {
    fn register(&mut self, app: AppId, cred: PeerCred) -> Result<(), Status> {
        log::info!("app {} registered: pid {} uid {} gid {}", app.0, cred.pid, cred.uid, cred.gid);
        self.apps.insert(app, App { cred, channels: Vec::new() });
        Ok(())
    }

    fn create_channel(&mut self, app: AppId) -> Result<ChannelGrant, Status> {
        if !self.apps.contains_key(&app) {
            return Err(Status::NotRegistered);
        }
        if self.channel_count() >= self.max_channels {
            log::warn!("app {}: channel refused, the daemon serves its maximum of {}", app.0, self.max_channels);
            return Err(Status::NoResources);
        }
        let id = self.next_channel;
        let name = format!("machnet-{id}");
        let (ch, fds) = match EngineChannel::create(&self.channel_cfg, &name, self.hugepages) {
            Ok(x) => x,
            Err(e) => {
                log::warn!("app {}: cannot create a channel: {e}", app.0);
                return Err(Status::NoResources);
            }
        };
        if !ch.is_hugepage_backed() {
            // Do not try hugepages again once they are unavailable: each failed try costs time.
            self.hugepages = false;
        }
        self.next_channel += 1;
        let shard = (0..self.shards.len()).min_by_key(|&i| self.shards[i].channels).expect("at least one shard");
        self.send(shard, ShardCmd::AddChannel(Box::new(ChannelSlot::new(id, app, ch))))?;
        self.shards[shard].channels += 1;
        let a = self.apps.get_mut(&app).expect("checked above");
        a.channels.push((id, shard));
        log::info!("app {} (pid {}): channel {id} on shard {shard}", app.0, a.cred.pid);
        Ok(ChannelGrant { id, fds })
    }

    fn detach_channel(&mut self, app: AppId, channel: u64) -> Result<(), Status> {
        let a = self.apps.get_mut(&app).ok_or(Status::NotRegistered)?;
        let pos = a.channels.iter().position(|&(id, _)| id == channel).ok_or(Status::NoSuchChannel)?;
        let (_, shard) = a.channels.swap_remove(pos);
        self.shards[shard].channels -= 1;
        self.send(shard, ShardCmd::RemoveChannel { id: channel })
    }

    fn app_gone(&mut self, app: AppId) {
        let Some(a) = self.apps.remove(&app) else { return };
        log::info!("app {} (pid {}) gone: closing its {} channels", app.0, a.cred.pid, a.channels.len());
        for (id, shard) in a.channels {
            self.shards[shard].channels -= 1;
            let _ = self.send(shard, ShardCmd::RemoveChannel { id });
        }
    }
}
