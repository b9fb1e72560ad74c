//! Live weight changes that keep every arm's plugin able to work.
//!
//! A weight change moves slots between arms, and a plugin's config may not
//! fit its new share (`reserved-aging` reserving its only slot for real-time
//! requests never starts batch work, and the starvation watchdog ejects it).
//! The plugin's own `init` knows what it needs: before a change is applied,
//! every arm whose share it changes is initialised again, in a fresh
//! instance, with its new `maitre.slots`; if one refuses, the change is
//! refused with that reason and nothing changes.

use crate::Host;
use crate::config::AbMode;
use crate::plugin::PluginLimits;
use crate::plugin::Runtime;
use crate::scheduler::slot_shares;

use super::{Reloader, init_config};

/// Why a weight change was refused.
#[derive(Debug, thiserror::Error)]
pub enum WeightError {
    /// No arm has that name.
    #[error("no arm named {0:?}; GET /status lists the arms")]
    NoArm(String),
    /// The change cannot be applied (the scheduler's or a plugin's reason).
    #[error("{0}")]
    Refused(String),
}

impl Reloader {
    /// Sets `arm`'s weight, once every arm whose slot share changes has
    /// accepted its new share in `init`. One change (or reload) at a time.
    pub async fn set_weight(&self, host: &Host, arm: &str, weight: u32) -> Result<(), WeightError> {
        let _one_at_a_time = self.serial.lock().await;
        self.check_weight(host, arm, weight).await?;
        host.sched
            .set_weight(arm, weight)
            .await
            .map_err(WeightError::Refused)
    }

    /// Runs `init` of each arm whose share would change, with that share.
    async fn check_weight(&self, host: &Host, arm: &str, weight: u32) -> Result<(), WeightError> {
        let cfg = host.config.load_full();
        if cfg.arms.iter().any(|a| a.name == arm && a.shadow) {
            return Err(WeightError::Refused(format!(
                "arm {arm:?} is a shadow: it watches and takes no traffic, so it has no weight; set `shadow = false` for it in the policy file to make it serve"
            )));
        }
        // In switchback every arm owns every slot in its turn: no share moves.
        if cfg.ab.mode != AbMode::Weighted {
            return Ok(());
        }
        let status = host
            .sched
            .status()
            .await
            .ok_or_else(|| WeightError::Refused("scheduler stopped".into()))?;
        let Some(i) = status.arms.iter().position(|a| a.name == arm) else {
            return Err(WeightError::NoArm(arm.to_string()));
        };
        let mut weights: Vec<u32> = status.arms.iter().map(|a| a.weight).collect();
        weights[i] = weight;
        if weights.iter().all(|w| *w == 0) {
            // The scheduler refuses this one with its own reason.
            return Ok(());
        }
        let shares = slot_shares(status.slots, &weights, None);
        let limits = PluginLimits::of(&cfg.limits);
        for (a, share) in status.arms.iter().zip(shares) {
            // An arm left with no slot drains; one whose share is unchanged
            // was checked when it was loaded.
            if share == 0 || share == a.slots {
                continue;
            }
            let Some(spec) = cfg.arms.iter().find(|c| c.name == a.name) else {
                continue;
            };
            let refuse = |e: &dyn std::fmt::Display| {
                WeightError::Refused(format!(
                    "weight {weight} for arm {arm:?} would leave arm {:?} {share} of {} slot(s), and its plugin refuses that share: {e}; keep the weight or change the arm's [policy.config] first",
                    a.name, status.slots
                ))
            };
            let (compiled, _) = self.compile(&spec.plugin).await.map_err(|e| refuse(&e))?;
            Runtime::global()
                .instantiate(&compiled, limits, &init_config(spec, share))
                .await
                .map_err(|e| refuse(&e))?;
        }
        Ok(())
    }
}
