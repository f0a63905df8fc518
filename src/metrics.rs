//! Prometheus metrics. Counters and gauges are recorded through the `metrics`
//! facade (`metrics::counter!` etc.) anywhere in Courier; this module owns the
//! recorder and renders the text served at `/metrics` on the RPC listener.
//!
//! The facade's recorder is process-wide by design: two relays in one test
//! process share one set of metrics. Nothing else in Courier is global.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

/// Renders the current metrics as Prometheus text.
#[derive(Clone)]
pub struct MetricsHandle {
    handle: PrometheusHandle,
}

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

impl MetricsHandle {
    /// Installs the recorder on first use; later calls share it.
    pub fn install() -> MetricsHandle {
        let handle = HANDLE
            .get_or_init(|| {
                let recorder = PrometheusBuilder::new().build_recorder();
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
