"""The monitor's screen (Textual): the signals, the pipeline's health, a filter, and keys.

::

    ┌ daq-agent monitor: agent http://127.0.0.1:9100   42/115 signals  sort: name ┐
    │ filter (/)                                                                  │
    │ Flow              Signal          Value    Unit  Label   Rate/s  Age        │
    │ can0.BMS_Pack…    ContactorState  2              Closed  10.00   0.03 s     │
    │ …                                                                           │
    │ Part         State    Detail                                                │
    │ can0 (can)   running  10.00 frames/s  received 1234 …                       │
    └ q quit  p pause  s sort  / filter ──────────────────────────────────────────┘

Keys: ``q`` quits, ``p`` pauses (the values stay as they are), ``s`` cycles the order (name,
rate, age), ``/`` goes to the filter (a part of ``flow.signal``, or a glob), ``Enter`` or ``Esc``
goes back to the table.
"""

from __future__ import annotations

from typing import ClassVar

from textual.app import App, ComposeResult
from textual.binding import Binding, BindingType
from textual.widgets import DataTable, Footer, Input, Static

from daq_agent.monitor.model import MonitorModel
from daq_agent.monitor.sources import MonitorSource

__all__ = ["MonitorApp"]

_SIGNAL_COLUMNS = ("Flow", "Signal", "Value", "Unit", "Label", "Rate/s", "Age")
_HEALTH_COLUMNS = ("Part", "State", "Detail")


class MonitorApp(App[int]):
    """The live view of one :class:`~daq_agent.monitor.sources.MonitorSource`.

    The source is started and stopped by the caller; the screen reads it every ``refresh_s``.
    The app's return value is 0 when quit with ``q``.

    Args:
        source: where the documents come from.
        refresh_s: the screen's refresh period.
        initial_filter: the filter to start with.
    """

    TITLE = "daq-agent monitor"
    ENABLE_COMMAND_PALETTE = False  # the keys are the ones in the footer
    CSS = """
    #title { height: 1; background: $primary; color: $text; padding: 0 1; }
    #filter { height: 3; }
    #signals { height: 1fr; }
    #health { height: auto; max-height: 14; border-top: solid $primary; }
    """
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("q", "quit_monitor", "quit"),
        Binding("p", "pause", "pause"),
        Binding("s", "sort", "sort"),
        Binding("slash", "focus_filter", "filter", key_display="/"),
        Binding("escape", "focus_table", "table", show=False),
    ]

    def __init__(
        self, source: MonitorSource, *, refresh_s: float = 0.5, initial_filter: str = ""
    ) -> None:
        super().__init__()
        self.source = source
        self.model = MonitorModel()
        self.model.filter = initial_filter
        self.refresh_s = refresh_s
        self._signal_keys: list[str] = []

    def compose(self) -> ComposeResult:
        """The title line, the filter, the two tables and the key bar."""
        yield Static("", id="title")
        yield Input(value=self.model.filter, placeholder="filter by name (/)", id="filter")
        signals: DataTable[str] = DataTable(id="signals", zebra_stripes=True)
        for label in _SIGNAL_COLUMNS:
            signals.add_column(label, key=label)
        yield signals
        health: DataTable[str] = DataTable(id="health", show_cursor=False)
        for label in _HEALTH_COLUMNS:
            health.add_column(label, key=label)
        yield health
        yield Footer()

    def on_mount(self) -> None:
        """Focus the table and start refreshing."""
        self.query_one("#signals", DataTable).focus()
        self.refresh_view()
        self.set_interval(self.refresh_s, self.refresh_view)

    # -- actions -----------------------------------------------------------------------------

    def action_quit_monitor(self) -> None:
        """Quit (exit status 0)."""
        self.exit(0)

    def action_pause(self) -> None:
        """Pause or resume the updates."""
        self.model.toggle_pause()
        self.refresh_view()

    def action_sort(self) -> None:
        """The next order."""
        self.model.cycle_sort()
        self.refresh_view()

    def action_focus_filter(self) -> None:
        """Type a filter (the title says so)."""
        self.query_one("#filter", Input).focus()
        self.call_after_refresh(self._draw_title)

    def action_focus_table(self) -> None:
        """Back to the table (the keys work again)."""
        self.query_one("#signals", DataTable).focus()
        self.call_after_refresh(self._draw_title)

    def on_input_changed(self, event: Input.Changed) -> None:
        """Filter as the user types."""
        self.model.filter = event.value
        self.refresh_view(fetch=False)

    def on_input_submitted(self, _event: Input.Submitted) -> None:
        """Enter: back to the table."""
        self.action_focus_table()

    # -- drawing -----------------------------------------------------------------------------

    def refresh_view(self, fetch: bool = True) -> None:
        """Take the source's latest document (unless paused) and redraw."""
        if fetch:
            document, error = self.source.document()
            self.model.update(document, error)
        self._draw_title()
        self._draw_signals()
        self._draw_health()

    def _draw_title(self) -> None:
        model = self.model
        shown = len(model.channels())
        parts = [
            f"daq-agent monitor: {self.source.title}",
            f"{shown}/{model.total_channels} signals",
            f"sort: {model.sort.value}",
        ]
        if model.run_line:
            parts.insert(1, model.run_line)
        if model.error:  # first: a long title is cut at the right
            parts.insert(1, f"! {model.error}")
        if isinstance(self.focused, Input):
            parts.append(f"filter: {model.filter}_ (Enter: done)")
        elif model.filter:
            parts.append(f"filter: {model.filter}")
        if model.paused:
            parts.append("PAUSED")

        self.query_one("#title", Static).update("   ".join(parts))

    def _draw_signals(self) -> None:
        table = self.query_one("#signals", DataTable)
        rows = self.model.signal_rows()
        keys = [row.key for row in rows]
        if keys == self._signal_keys:
            for row in rows:
                for column, cell in zip(_SIGNAL_COLUMNS[2:], row.cells[2:], strict=True):
                    table.update_cell(row.key, column, cell)
            return
        table.clear()
        for row in rows:
            table.add_row(*row.cells, key=row.key)
        self._signal_keys = keys

    def _draw_health(self) -> None:
        table = self.query_one("#health", DataTable)
        table.clear()
        for row in self.model.health_rows():
            table.add_row(*row.cells)
