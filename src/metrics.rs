//! Prometheus metrics. Counters and gauges are recorded through the `metrics`
//! facade (`metrics::counter!` etc.) anywhere in Courier; this module owns the
//! recorder and renders the text served at `/metrics` on the RPC listener.
//!
//! The facade's recorder is process-wide by design: two relays in one test
//! process share one set of metrics. Nothing else in Courier is global.
//!
//! Gauges are dropped from the output once nothing has set them for
//! [`GAUGE_IDLE_TIMEOUT`] (the facade has no way to remove a series), so
//! every gauge must be re-set periodically by its owner while it is
//! meaningful. The sender does so every 30 s and stops setting the
//! per-destination gauges of destinations with nothing queued, whose
//! series therefore go away instead of accumulating forever.

use std::sync::OnceLock;
use std::time::Duration;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use metrics_util::MetricKindMask;

/// A gauge not set for this long is dropped from the output.
pub const GAUGE_IDLE_TIMEOUT: Duration = Duration::from_secs(300);

/// Renders the current metrics as Prometheus text.
#[derive(Clone)]
pub struct MetricsHandle {
    handle: PrometheusHandle,
}

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

impl MetricsHandle {
    /// Installs the recorder on first use; later calls share it.
    pub fn install() -> MetricsHandle {
        Self::install_with_gauge_idle_timeout(GAUGE_IDLE_TIMEOUT)
    }

    /// As [`install`](Self::install), with another gauge idle timeout if
    /// this is the first call in the process (tests).
    pub fn install_with_gauge_idle_timeout(gauge_idle_timeout: Duration) -> MetricsHandle {
        let handle = HANDLE
            .get_or_init(|| {
                let recorder = PrometheusBuilder::new()
                    .idle_timeout(MetricKindMask::GAUGE, Some(gauge_idle_timeout))
                    .build_recorder();
                let handle = recorder.handle();
                // Another recorder may already be installed (an embedding
                // program's): then our handle renders nothing, which is
                // preferable to failing start-up.
                let _ = metrics::set_global_recorder(recorder);
                handle
            })
            .clone();
        MetricsHandle { handle }
    }

    pub fn render(&self) -> String {
        self.handle.render()
    }
}
