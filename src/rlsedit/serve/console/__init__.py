"""The curators' web console served at ``/``: static pages (``static/``) and the routes under
``/v1/console`` they call (:mod:`.routes`): answers of the unedited model beside the edited
one (:mod:`.unedited`), "does the model say it now?" per edit and the forgetting curve
(:mod:`.checks`), and drift per weight version (:mod:`.drift`)."""

from .routes import register_console

__all__ = ["register_console"]
