//! Latency histograms: their bounds, and the encoding worker results carry them in.

use anyhow::{Context, Result};
use base64::{Engine, engine::general_purpose::STANDARD};
use hdrhistogram::{
    Histogram,
    serialization::{Deserializer, Serializer, V2Serializer},
};

/// Largest latency recorded, µs (one hour); larger values are clamped.
pub const MAX_LATENCY_US: u64 = 3_600_000_000;

/// An empty latency histogram: 1 µs to one hour, 3 significant digits.
pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_LATENCY_US, 3).expect("valid histogram bounds")
}

/// Encodes a histogram for a worker's JSON (HdrHistogram V2 format, base64).
pub fn encode_histogram(h: &Histogram<u64>) -> String {
    let mut buf = Vec::new();
    V2Serializer::new().serialize(h, &mut buf).expect("serializing to memory");
    STANDARD.encode(buf)
}

/// Decodes [`encode_histogram`]'s output.
pub fn decode_histogram(s: &str) -> Result<Histogram<u64>> {
    if s.is_empty() {
        return Ok(new_histogram());
    }
    let bytes = STANDARD.decode(s).context("histogram is not base64")?;
    let h: Histogram<u64> = Deserializer::new()
        .deserialize(&mut &bytes[..])
        .map_err(|e| anyhow::anyhow!("bad histogram: {e:?}"))?;
    Ok(h)
}

/// Adds two encoded histograms; the sum, encoded.
pub(super) fn merge_histograms(a: &str, b: &str) -> Result<String> {
    let mut h = decode_histogram(a)?;
    let other = decode_histogram(b)?;
    if !other.is_empty() {
        h.add(&other).map_err(|e| anyhow::anyhow!("merging histograms: {e:?}"))?;
    }
    Ok(encode_histogram(&h))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_round_trip_and_merge() {
        let mut a = new_histogram();
        let mut b = new_histogram();
        for v in 1..=1000 {
            a.record(v).unwrap();
        }
        b.record(50_000).unwrap();
        b.saturating_record(u64::MAX);
        let ea = encode_histogram(&a);
        assert_eq!(decode_histogram(&ea).unwrap(), a);
        let merged = decode_histogram(&merge_histograms(&ea, &encode_histogram(&b)).unwrap()).unwrap();
        assert_eq!(merged.len(), 1002);
        assert!(merged.max() >= MAX_LATENCY_US);
        assert_eq!(decode_histogram("").unwrap().len(), 0);
    }
}
