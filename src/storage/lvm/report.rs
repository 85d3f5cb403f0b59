//! Facts about LVs from lvm2's JSON report:
//! `lvs --reportformat json --units b --nosuffix -o REPORT_FIELDS LV…`.
//!
//! The report's grammar, as lvm2 prints it (every value a string; sizes in
//! bytes without a suffix; a field that does not apply is ""):
//! `{"report":[{"lv":[{"vg_name":"…","lv_name":"…",…},…]},…]}`.

use serde::Deserialize;

/// One line of `lvs` output, for the fields [`REPORT_FIELDS`] asks for.
#[derive(Debug, Clone, PartialEq)]
pub struct LvReport {
    pub vg: String,
    pub lv: String,
    /// `lv_attr`, e.g. `-wi-a-----` (linear) or `Vwi-a-tz--` (thin).
    pub attr: String,
    pub size: u64,
    pub segtype: String,
    /// The thin pool, for a thin LV.
    pub pool: Option<String>,
    pub vg_free: u64,
    pub extent_size: u64,
    pub tags: Vec<String>,
    /// For a thin pool: the share of its data space in use; for a thin LV: of its size.
    pub data_percent: Option<f64>,
    /// A thin pool zeroes newly provisioned blocks.
    pub zero: bool,
    /// A thin pool's discard mode: passdown, nopassdown or ignore.
    pub discards: String,
}

impl LvReport {
    pub fn is_thin(&self) -> bool {
        self.segtype == "thin" || self.attr.starts_with('V')
    }

    pub fn is_active(&self) -> bool {
        self.attr.as_bytes().get(4) == Some(&b'a')
    }

    /// A `fvd-grow-unit=SIZE` tag on the LV.
    /// The tag `fvd-keep-slack`: a stopped image keeps the space its LV grew ahead.
    pub fn keeps_slack(&self) -> bool {
        self.tags.iter().any(|t| t == "fvd-keep-slack")
    }

    pub fn grow_unit_tag(&self) -> Option<Result<u64, String>> {
        let v = self.tags.iter().find_map(|t| t.strip_prefix("fvd-grow-unit="))?;
        Some(crate::units::parse_size(v).map(|b| b.0))
    }
}

/// The fields asked of `lvs`: each is a key of a row in the report.
pub const REPORT_FIELDS: &str =
    "vg_name,lv_name,lv_attr,lv_size,segtype,pool_lv,vg_free,vg_extent_size,lv_tags,data_percent,zero,discards";

/// The whole report: one section per command run, each listing LVs.
#[derive(Deserialize)]
struct Report {
    report: Vec<Section>,
}

#[derive(Deserialize)]
struct Section {
    #[serde(default)]
    lv: Vec<Row>,
}

/// One LV as lvm2 prints it, for the fields [`REPORT_FIELDS`] asks for.
#[derive(Deserialize)]
struct Row {
    vg_name: String,
    lv_name: String,
    lv_attr: String,
    lv_size: String,
    segtype: String,
    pool_lv: String,
    vg_free: String,
    vg_extent_size: String,
    lv_tags: String,
    data_percent: String,
    zero: String,
    discards: String,
}

impl Row {
    fn into_report(self) -> Result<LvReport, String> {
        let at = format!("{}/{}", self.vg_name, self.lv_name);
        let num = |v: &str, what: &str| -> Result<u64, String> {
            v.trim().parse::<u64>().map_err(|_| format!("lvs gave {what} '{v}' for {at}"))
        };
        let data_percent = match self.data_percent.trim() {
            "" => None,
            s => Some(s.parse::<f64>().map_err(|_| format!("lvs gave data_percent '{s}' for {at}"))?),
        };
        Ok(LvReport {
            size: num(&self.lv_size, "lv_size")?,
            vg_free: num(&self.vg_free, "vg_free")?,
            extent_size: num(&self.vg_extent_size, "vg_extent_size")?,
            pool: Some(self.pool_lv).filter(|p| !p.is_empty()),
            tags: self.lv_tags.split(',').filter(|t| !t.is_empty()).map(str::to_string).collect(),
            data_percent,
            zero: self.zero == "zero",
            discards: self.discards,
            vg: self.vg_name,
            lv: self.lv_name,
            attr: self.lv_attr,
            segtype: self.segtype,
        })
    }
}

/// Parses lvm2's JSON report (see the module's grammar), every LV of every
/// section in order. Empty output lists no LV.
pub fn parse_report(text: &str) -> Result<Vec<LvReport>, String> {
    if text.trim().is_empty() {
        return Ok(Vec::new());
    }
    let r: Report = serde_json::from_str(text).map_err(|e| format!("unexpected lvs report: {e}"))?;
    r.report.into_iter().flat_map(|s| s.lv).map(Row::into_report).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// As lvm2 2.03 prints it for a linear LV, a thin LV and its pool.
    const SAMPLE: &str = r#"  {
      "report": [
          {
              "lv": [
                  {"vg_name":"fvdtest", "lv_name":"lin-x", "lv_attr":"-wi-a-----", "lv_size":"67108864", "segtype":"linear", "pool_lv":"", "vg_free":"322961408", "vg_extent_size":"4194304", "lv_tags":"fvd-grow-unit=256M,x", "data_percent":"", "zero":"", "discards":""},
                  {"vg_name":"fvdtest", "lv_name":"thin", "lv_attr":"Vwi-a-tz--", "lv_size":"134217728", "segtype":"thin", "pool_lv":"pool", "vg_free":"322961408", "vg_extent_size":"4194304", "lv_tags":"", "data_percent":"18.75", "zero":"zero", "discards":"passdown"},
                  {"vg_name":"fvdtest", "lv_name":"pool", "lv_attr":"twi-aotz--", "lv_size":"134217728", "segtype":"thin-pool", "pool_lv":"", "vg_free":"322961408", "vg_extent_size":"4194304", "lv_tags":"", "data_percent":"0.00", "zero":"zero", "discards":"passdown"}
              ]
          }
      ]
  }
"#;

    #[test]
    fn parses_the_json_report() {
        let r = parse_report(SAMPLE).unwrap();
        assert_eq!(r.len(), 3);
        assert_eq!(r[0].vg, "fvdtest");
        assert_eq!(r[0].lv, "lin-x");
        assert_eq!(r[0].size, 64 << 20);
        assert_eq!(r[0].vg_free, 322961408);
        assert!(!r[0].is_thin());
        assert!(r[0].is_active());
        assert_eq!(r[0].pool, None);
        assert_eq!(r[0].tags, vec!["fvd-grow-unit=256M", "x"]);
        assert_eq!(r[0].grow_unit_tag(), Some(Ok(256 << 20)));
        assert_eq!(r[0].data_percent, None);
        assert!(!r[0].zero);
        assert!(r[1].is_thin());
        assert_eq!(r[1].pool.as_deref(), Some("pool"));
        assert_eq!(r[1].data_percent, Some(18.75));
        assert_eq!(r[1].grow_unit_tag(), None);
        assert!(r[1].tags.is_empty());
        assert!(r[2].zero);
        assert_eq!(r[2].discards, "passdown");
        assert_eq!(r[2].extent_size, 4 << 20);
        assert_eq!(r[2].data_percent, Some(0.0));
    }

    #[test]
    fn odd_reports() {
        assert!(parse_report("").unwrap().is_empty());
        assert!(parse_report(r#"{"report":[{"lv":[]}]}"#).unwrap().is_empty());
        // A command log section (log/report_command_log) and unknown keys are passed over.
        let one = SAMPLE.replace(r#""discards":""}"#, r#""discards":"", "lv_uuid":"u"}"#);
        let with_log = one.trim_end().trim_end_matches('}').to_string() + r#", "log": [{"log_seq_num":"1"}]}"#;
        assert_eq!(parse_report(&with_log).unwrap().len(), 3);
        // The old pipe-separated output, a missing field, a number that is not one.
        assert!(parse_report("  fvdtest|l|-wi-a-----|1|linear||1|1||||\n").is_err());
        assert!(parse_report(&SAMPLE.replace(r#""zero":"", "#, "")).is_err());
        let e = parse_report(&SAMPLE.replace(r#""lv_size":"67108864""#, r#""lv_size":"64m""#)).unwrap_err();
        assert!(e.contains("lv_size '64m' for fvdtest/lin-x"), "{e}");
        assert!(parse_report(&SAMPLE.replace(r#""18.75""#, r#""x""#)).is_err());
        // Values are strings: numbers where strings belong are refused, not guessed at.
        assert!(parse_report(&SAMPLE.replace(r#""lv_size":"67108864""#, r#""lv_size":67108864"#)).is_err());
    }
}
