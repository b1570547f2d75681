//! Bar charts of the benchmark: median per system, with a min–max whisker.

use std::{collections::BTreeMap, path::Path, sync::Once};

use anyhow::Context as _;
use plotters::prelude::*;

use super::{
    System,
    stats::{Sample, stat},
};

static FONT: Once = Once::new();

/// plotters draws text with ab_glyph; it needs a font registered once.
fn register_font() -> anyhow::Result<()> {
    let mut result = Ok(());
    FONT.call_once(|| {
        let path = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";
        result = std::fs::read(path).with_context(|| format!("{path} (install fonts-dejavu-core)")).and_then(|b| {
            let b: &'static [u8] = Box::leak(b.into_boxed_slice());
            plotters::style::register_font("sans-serif", FontStyle::Normal, b)
                .map_err(|_| anyhow::anyhow!("{path} is not a usable font"))
        });
    });
    result
}

pub fn bars(path: &Path, title: &str, by_sys: &BTreeMap<System, Vec<Sample>>, metric: &str) -> anyhow::Result<()> {
    register_font()?;
    let rows: Vec<(&str, f64, f64, f64)> = by_sys
        .iter()
        .filter_map(|(sys, samples)| {
            let st = stat(samples, metric)?;
            Some((sys.name(), st.median, st.min, st.max))
        })
        .collect();
    if rows.is_empty() {
        return Ok(());
    }
    let top = rows.iter().map(|r| r.3).fold(0.0, f64::max) * 1.15 + f64::EPSILON;
    let root = BitMapBackend::new(path, (900, 500)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 24))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d((0..rows.len().max(2) - 1).into_segmented(), 0.0..top)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_label_formatter(&|x| match x {
            SegmentValue::CenterOf(i) => rows.get(*i).map_or(String::new(), |r| r.0.to_owned()),
            _ => String::new(),
        })
        .label_style(("sans-serif", 15))
        .draw()?;
    let colors = [
        RGBColor(90, 90, 90),
        RGBColor(31, 119, 180),
        RGBColor(120, 170, 220),
        RGBColor(214, 39, 40),
        RGBColor(240, 130, 120),
        RGBColor(44, 160, 44),
    ];
    chart.draw_series(rows.iter().enumerate().map(|(i, r)| {
        let c = colors[i % colors.len()];
        let mut bar = Rectangle::new([(SegmentValue::Exact(i), 0.0), (SegmentValue::Exact(i + 1), r.1)], c.filled());
        bar.set_margin(0, 0, 12, 12);
        bar
    }))?;
    chart.draw_series(rows.iter().enumerate().map(|(i, r)| {
        PathElement::new(
            vec![(SegmentValue::CenterOf(i), r.2), (SegmentValue::CenterOf(i), r.3)],
            BLACK.stroke_width(2),
        )
    }))?;
    chart.draw_series(rows.iter().enumerate().map(|(i, r)| {
        Text::new(crate::format_figure(r.1, 3), (SegmentValue::CenterOf(i), r.3 + top * 0.02), ("sans-serif", 14))
    }))?;
    root.present()?;
    Ok(())
}
