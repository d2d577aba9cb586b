//! Results: what each process measures, how worker results merge, and the summary
//! (printed as a table and written as JSON).

mod histogram;
mod per_process;
mod summary;
mod table;

pub use self::{
    histogram::{MAX_LATENCY_US, encode_histogram, new_histogram},
    per_process::{ConnectReport, DeliveryReport, Window},
    summary::{ServerRow, ServerSamples, Summary},
};
