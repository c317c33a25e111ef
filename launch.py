"""Start the Cascade Reader web UI: python launch.py [--host H] [--port P] [--model SPEC] [--device D] [--share]."""

from app.main import main

if __name__ == "__main__":
    main()
